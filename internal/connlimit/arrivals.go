package connlimit

import (
	"context"
	"errors"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// Requests bounds what the RPCs of one gRPC port may make the server hold.
// Zero fields take the defaults.
type Requests struct {
	// MaxMessage is the largest request message, in bytes; a larger one is
	// refused before it is read. Zero means DefaultMaxMessage.
	MaxMessage int
	// MaxStreams is how many streams one connection may have open at once
	// (SETTINGS_MAX_CONCURRENT_STREAMS: a client queues the rest). Zero
	// means DefaultMaxStreams.
	MaxStreams uint32
	// MaxArriving is how many RPCs of one connection may be waiting for
	// their request message at once; the next is refused with
	// RESOURCE_EXHAUSTED. Zero means MaxStreams.
	MaxArriving int
}

// Defaults of Requests, and what RPCs still waiting for their request
// message may hold across one port.
const (
	DefaultMaxMessage = 256 << 10
	DefaultMaxStreams = 1024
	// arrivingBudget is the bytes that RPCs waiting for their request
	// message may hold across one port: each may hold up to MaxMessage, so
	// the port has arrivingBudget/MaxMessage places for them.
	arrivingBudget = 256 << 20
	// arrivalGrace: a request that has been arriving for less than this is
	// never cut to make room for another connection's.
	arrivalGrace = time.Second
)

func (r Requests) withDefaults() Requests {
	if r.MaxMessage <= 0 {
		r.MaxMessage = DefaultMaxMessage
	}
	if r.MaxStreams == 0 {
		r.MaxStreams = DefaultMaxStreams
	}
	if r.MaxArriving <= 0 || r.MaxArriving > int(r.MaxStreams) {
		r.MaxArriving = int(r.MaxStreams)
	}
	return r
}

// Errors a refused or cut RPC ends with.
var (
	errConnArriving = status.Error(codes.ResourceExhausted, "connlimit: too many requests of this connection still arriving")
	errPortArriving = status.Error(codes.ResourceExhausted, "connlimit: too many requests still arriving")
	errSlowRequest  = errors.New("connlimit: request message not received in time")
	errMadeRoom     = errors.New("connlimit: request message still arriving, cut to make room for another connection's")
)

// arrivals bounds RPCs that are waiting for their request message. gRPC
// reads a request message as it arrives, up to MaxMessage, and sets no
// deadline on the read: without this, a peer with no credentials could
// open MaxStreams streams per connection on MaxConnections connections,
// send each message but its last byte, answer keepalive pings, and hold
// MaxMessage bytes per stream for as long as it liked.
//
// An RPC is arriving from its headers until its handler has the first
// request message (unary: the handler is called; streaming: the first
// RecvMsg returns). While arriving it
//   - counts against its connection: at most MaxArriving, and the next is
//     refused (only that connection's own RPCs are ever refused for it);
//   - counts against the port: at most arrivingBudget/MaxMessage. When
//     the port is full, a new RPC takes the place of the oldest arriving
//     RPC of the connection with the most, if that connection has at
//     least two more than the new RPC's and that RPC has been arriving
//     for arrivalGrace: one peer's slow requests never keep another's
//     out, and a request that arrives at once is never cut. Only when no
//     such place exists is the new RPC refused;
//   - is cut after timeout.
//
// Once the message is in, the RPC holds what its handler holds. A
// long-lived stream's later messages (an xDS proxy's requests) are not
// bounded here: only a proxy with a workload certificate gets a stream
// past its first message, and each holds at most MaxMessage.
type arrivals struct {
	maxPerConn, slots int
	timeout, grace    time.Duration
	now               func() time.Time

	mu    sync.Mutex
	total int
	// conns holds the arriving RPCs of each connection that has one, in
	// arrival order, keyed by the connection's peer (grpc-go puts one
	// *peer.Peer in the context of every stream of a connection).
	conns map[*peer.Peer][]*arrival
}

type arrival struct {
	conn   *peer.Peer
	since  time.Time
	cancel context.CancelCauseFunc
	timer  *time.Timer
	stop   func() bool // the context.AfterFunc that ends it with its stream
	done   bool        // under arrivals.mu
}

type arrivalKey struct{}

func newArrivals(r Requests, timeout time.Duration) *arrivals {
	return &arrivals{
		maxPerConn: r.MaxArriving,
		slots:      max(arrivingBudget/r.MaxMessage, r.MaxArriving),
		timeout:    timeout,
		grace:      arrivalGrace,
		now:        time.Now,
		conns:      map[*peer.Peer][]*arrival{},
	}
}

// tap admits a new RPC (grpc.InTapHandle: it runs on the connection's
// reading goroutine, so it never waits).
func (ar *arrivals) tap(ctx context.Context, _ *tap.Info) (context.Context, error) {
	p, _ := peer.FromContext(ctx)
	now := ar.now()
	ar.mu.Lock()
	mine := len(ar.conns[p])
	if mine >= ar.maxPerConn {
		ar.mu.Unlock()
		return nil, errConnArriving
	}
	var cut *arrival
	if ar.total >= ar.slots {
		if cut = ar.victimLocked(mine, now); cut == nil {
			ar.mu.Unlock()
			return nil, errPortArriving
		}
		ar.removeLocked(cut)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	a := &arrival{conn: p, since: now, cancel: cancel}
	a.timer = time.AfterFunc(ar.timeout, func() { ar.cut(a, errSlowRequest) })
	a.stop = context.AfterFunc(ctx, func() { ar.arrived(a) })
	ar.conns[p] = append(ar.conns[p], a)
	ar.total++
	ar.mu.Unlock()
	if cut != nil {
		cut.end(errMadeRoom)
	}
	return context.WithValue(ctx, arrivalKey{}, a), nil
}

// victimLocked returns the RPC whose place a new RPC of a connection with
// mine arriving RPCs takes, or nil.
func (ar *arrivals) victimLocked(mine int, now time.Time) *arrival {
	var fattest []*arrival
	for _, as := range ar.conns {
		if len(as) > len(fattest) {
			fattest = as
		}
	}
	if len(fattest) < mine+2 || now.Sub(fattest[0].since) < ar.grace {
		return nil
	}
	return fattest[0]
}

// removeLocked takes a out of the arriving RPCs; it reports false if a
// was no longer one.
func (ar *arrivals) removeLocked(a *arrival) bool {
	if a.done {
		return false
	}
	a.done = true
	as := ar.conns[a.conn]
	for i, b := range as {
		if b == a {
			as = append(as[:i], as[i+1:]...)
			break
		}
	}
	if len(as) == 0 {
		delete(ar.conns, a.conn)
	} else {
		ar.conns[a.conn] = as
	}
	ar.total--
	return true
}

// arrived ends a's wait: its message is in, or its stream ended.
func (ar *arrivals) arrived(a *arrival) {
	ar.mu.Lock()
	ok := ar.removeLocked(a)
	ar.mu.Unlock()
	if ok {
		a.timer.Stop()
		a.stop()
	}
}

// cut ends a's RPC if its message is still arriving.
func (ar *arrivals) cut(a *arrival, why error) {
	ar.mu.Lock()
	ok := ar.removeLocked(a)
	ar.mu.Unlock()
	if ok {
		a.end(why)
	}
}

// end cancels the RPC of a, which is no longer among the arriving: grpc-go
// abandons the read and resets the stream, freeing what it received.
func (a *arrival) end(why error) {
	a.timer.Stop()
	a.stop()
	a.cancel(why)
}

func (ar *arrivals) arrivedCtx(ctx context.Context) {
	if a, ok := ctx.Value(arrivalKey{}).(*arrival); ok {
		ar.arrived(a)
	}
}

// arrivedStream marks its RPC's message in when the first RecvMsg returns
// (for an RPC whose client sends one message: after its end of stream).
type arrivedStream struct {
	grpc.ServerStream
	ar    *arrivals
	first bool
}

func (s *arrivedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if s.first {
		s.first = false
		s.ar.arrivedCtx(s.Context())
	}
	return err
}

func (ar *arrivals) options() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InTapHandle(ar.tap),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			ar.arrivedCtx(ctx)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, &arrivedStream{ServerStream: ss, ar: ar, first: true})
		}),
	}
}
