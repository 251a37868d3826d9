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
// An RPC whose stream ends before its message is in (the client reset
// it, or grpc-go refused the message) keeps its place until the timeout
// passes or a full connection or port looks for room: then its place is
// freed first.
//
// Once the message is in, the RPC holds what its handler holds. A
// long-lived stream's later messages (an xDS proxy's requests) are not
// bounded here: only a proxy with a workload certificate gets a stream
// past its first message, and each holds at most MaxMessage.
type arrivals struct {
	maxPerConn, slots int
	timeout, grace    time.Duration
	now               func() time.Time

	mu sync.Mutex
	// The arriving RPCs, oldest first (all have the same timeout, so the
	// first is the next to expire), and how many each connection has,
	// keyed by its peer (grpc-go puts one *peer.Peer in the context of
	// every stream of a connection).
	head, tail *arrival
	total      int
	perConn    map[*peer.Peer]int
	// timer fires when head's time is up, while armed.
	timer *time.Timer
	armed bool
}

type arrival struct {
	conn       *peer.Peer
	since      time.Time
	ctx        context.Context
	cancel     context.CancelCauseFunc
	prev, next *arrival
	done       bool // under arrivals.mu
}

type arrivalKey struct{}

func newArrivals(r Requests, timeout time.Duration) *arrivals {
	return &arrivals{
		maxPerConn: r.MaxArriving,
		slots:      max(arrivingBudget/r.MaxMessage, r.MaxArriving),
		timeout:    timeout,
		grace:      arrivalGrace,
		now:        time.Now,
		perConn:    map[*peer.Peer]int{},
	}
}

// tap admits a new RPC (grpc.InTapHandle: it runs on the connection's
// reading goroutine, so it never waits).
func (ar *arrivals) tap(ctx context.Context, _ *tap.Info) (context.Context, error) {
	p, _ := peer.FromContext(ctx)
	now := ar.now()
	ar.mu.Lock()
	if ar.perConn[p] >= ar.maxPerConn {
		ar.purgeLocked(p)
		if ar.perConn[p] >= ar.maxPerConn {
			ar.mu.Unlock()
			return nil, errConnArriving
		}
	}
	var cut *arrival
	if ar.total >= ar.slots {
		ar.purgeLocked(nil)
		if ar.total >= ar.slots {
			if cut = ar.victimLocked(ar.perConn[p], now); cut == nil {
				ar.mu.Unlock()
				return nil, errPortArriving
			}
			ar.removeLocked(cut)
		}
	}
	a := &arrival{conn: p, since: now}
	a.ctx, a.cancel = context.WithCancelCause(ctx)
	if a.prev = ar.tail; ar.tail != nil {
		ar.tail.next = a
	} else {
		ar.head = a
	}
	ar.tail = a
	ar.perConn[p]++
	ar.total++
	if !ar.armed {
		ar.armLocked(now)
	}
	ar.mu.Unlock()
	if cut != nil {
		cut.cancel(errMadeRoom)
	}
	return context.WithValue(a.ctx, arrivalKey{}, a), nil
}

// victimLocked returns the RPC whose place a new RPC of a connection with
// mine arriving RPCs takes, or nil.
func (ar *arrivals) victimLocked(mine int, now time.Time) *arrival {
	var fattest *peer.Peer
	most := 0
	for p, n := range ar.perConn {
		if n > most {
			fattest, most = p, n
		}
	}
	if most < mine+2 {
		return nil
	}
	for a := ar.head; a != nil; a = a.next {
		if a.conn == fattest {
			if now.Sub(a.since) < ar.grace {
				return nil
			}
			return a
		}
	}
	return nil
}

// purgeLocked frees the places of RPCs (of connection p, or of all if p
// is nil) whose streams have ended.
func (ar *arrivals) purgeLocked(p *peer.Peer) {
	for a := ar.head; a != nil; {
		next := a.next
		if (p == nil || a.conn == p) && a.ctx.Err() != nil {
			ar.removeLocked(a)
		}
		a = next
	}
}

// removeLocked takes a out of the arriving RPCs; it reports false if a
// was no longer one.
func (ar *arrivals) removeLocked(a *arrival) bool {
	if a.done {
		return false
	}
	a.done = true
	if a.prev != nil {
		a.prev.next = a.next
	} else {
		ar.head = a.next
	}
	if a.next != nil {
		a.next.prev = a.prev
	} else {
		ar.tail = a.prev
	}
	a.prev, a.next = nil, nil
	if ar.perConn[a.conn]--; ar.perConn[a.conn] == 0 {
		delete(ar.perConn, a.conn)
	}
	ar.total--
	return true
}

// armLocked sets the timer for the oldest arriving RPC.
func (ar *arrivals) armLocked(now time.Time) {
	if ar.head == nil {
		return
	}
	d := ar.head.since.Add(ar.timeout).Sub(now)
	if ar.timer == nil {
		ar.timer = time.AfterFunc(d, ar.expire)
	} else {
		ar.timer.Reset(d)
	}
	ar.armed = true
}

// expire cuts the RPCs whose message is still arriving after timeout.
func (ar *arrivals) expire() {
	var cut []*arrival
	ar.mu.Lock()
	now := ar.now()
	for ar.head != nil && !now.Before(ar.head.since.Add(ar.timeout)) {
		a := ar.head
		ar.removeLocked(a)
		if a.ctx.Err() == nil {
			cut = append(cut, a)
		}
	}
	ar.armed = false
	ar.armLocked(now)
	ar.mu.Unlock()
	// grpc-go abandons the read and resets the stream, freeing what it
	// received.
	for _, a := range cut {
		a.cancel(errSlowRequest)
	}
}

// arrived ends a's wait: its message is in.
func (ar *arrivals) arrived(a *arrival) {
	ar.mu.Lock()
	ar.removeLocked(a)
	ar.mu.Unlock()
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
