package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/attest"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/agent/socket"
	"github.com/trustmesh/trustmesh/agent/workloadapi"
)

// Identities is what the node's socket serves: the entries the node holds
// and a store per identity. *Holder is one.
type Identities interface {
	// Entries returns the current entries and a channel closed at the next
	// change (of the entries, or of which identities are held).
	Entries() ([]Entry, <-chan struct{})
	// Store returns the store of id; nil if the node does not hold it (yet).
	Store(id spiffeid.ID) *identity.Store
	// Refresh fetches the entries now (rate-limited inside).
	Refresh(ctx context.Context) error
}

var _ Identities = (*Holder)(nil)

// Defaults of ServerConfig.
const (
	DefaultSocketPath    = "/run/trustmesh/node/socket"
	DefaultPendingWait   = 5 * time.Second
	DefaultAliveInterval = 5 * time.Second
)

// ServerConfig configures a Server.
type ServerConfig struct {
	Identities Identities
	// SocketPath is where the socket lives; DefaultSocketPath if empty.
	SocketPath string
	// Attest configures how callers are attested.
	Attest attest.Options
	// PendingWait bounds how long a caller is waited for: one that matches
	// no entry (a pod just started, whose entry the CA has not listed yet),
	// with Refresh, before PermissionDenied; and one that matches entries
	// the node has no certificate for yet, before Unavailable. Default
	// DefaultPendingWait.
	PendingWait time.Duration
	// AliveInterval is how often an open stream checks that its caller is
	// still the process attested, besides before every send. Default
	// DefaultAliveInterval.
	AliveInterval time.Duration
	// Clock defaults to the real clock.
	Clock  clock.Clock
	Logger *slog.Logger
}

// Server serves the SPIFFE Workload API and SDS on one unix socket to every
// local process: each call is attested, and the caller gets exactly the
// identities whose entries' selectors it matches (sorted by ID; SDS
// "default" is the first) and the bundle; one matching no entry gets
// PermissionDenied. The socket is connectable by every local user (0666),
// as SPIRE's agent socket is: attestation, not the file mode, decides.
type Server struct {
	cfg ServerConfig
	wl  *workloadapi.Server
	sds *sds.Server
}

// NewServer checks cfg and returns a server; Run serves.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Identities == nil {
		return nil, errors.New("node: server: Identities is required")
	}
	if cfg.SocketPath == "" {
		cfg.SocketPath = DefaultSocketPath
	}
	if cfg.PendingWait < 0 || cfg.AliveInterval < 0 {
		return nil, errors.New("node: server: PendingWait and AliveInterval must not be negative")
	}
	if cfg.PendingWait == 0 {
		cfg.PendingWait = DefaultPendingWait
	}
	if cfg.AliveInterval == 0 {
		cfg.AliveInterval = DefaultAliveInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg}
	var err error
	if s.wl, err = workloadapi.New(workloadapi.Config{Resolve: s.resolve, Logger: cfg.Logger.With("component", "workloadapi")}); err != nil {
		return nil, fmt.Errorf("node: server: %w", err)
	}
	if s.sds, err = sds.New(sds.Config{Resolve: s.resolve, Logger: cfg.Logger.With("component", "sds")}); err != nil {
		return nil, fmt.Errorf("node: server: %w", err)
	}
	return s, nil
}

// Run serves on the socket until ctx ends; see socket.Socket.Run.
func (s *Server) Run(ctx context.Context) error {
	g := grpc.NewServer(grpc.Creds(attest.Credentials(s.cfg.Attest)))
	s.wl.Register(g)
	s.sds.Register(g)
	sock, err := socket.New(socket.Config{
		Path: s.cfg.SocketPath, GID: -1, AnyUser: true, Server: g, Logger: s.cfg.Logger.With("component", "socket"),
	})
	if err != nil {
		return fmt.Errorf("node: server: %w", err)
	}
	return sock.Run(ctx)
}

// Answers to callers. They say what the caller lacks, never what others
// hold.
var (
	errNotAttested = status.Error(codes.PermissionDenied, "the caller could not be attested")
	errGone        = status.Error(codes.PermissionDenied, "the attested process is gone")
	errNoEntry     = status.Error(codes.PermissionDenied, "no identity of this node is for the caller")
	errNotIssued   = status.Error(codes.Unavailable, "the caller's identities are not issued yet")
)

// refreshEvery is how often a caller that matches nothing asks for the
// entries again while it is waited for.
const refreshEvery = time.Second

// resolve attests the caller of ctx and returns its viewer once it matches
// an entry, waiting up to PendingWait (refreshing the entries) for one.
func (s *Server) resolve(ctx context.Context) (identity.Viewer, error) {
	peer, ok := attest.PeerFromContext(ctx)
	if !ok {
		return nil, errNotAttested
	}
	caller, err := peer.Attest(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		s.cfg.Logger.Info("refused a caller that could not be attested", "pid", peer.PID(), "error", err)
		if errors.Is(err, attest.ErrGone) {
			return nil, errGone
		}
		return nil, errNotAttested
	}
	deadline := s.cfg.Clock.Now().Add(s.cfg.PendingWait)
	for {
		entries, changed := s.cfg.Identities.Entries()
		if len(matching(caller, entries)) > 0 {
			// The wait for issuance starts now, however long the wait
			// for an entry took.
			return &viewer{s: s, peer: peer, caller: caller, started: s.cfg.Clock.Now()}, nil
		}
		left := deadline.Sub(s.cfg.Clock.Now())
		if left <= 0 {
			s.cfg.Logger.Info("refused a caller that matches no entry", "pid", caller.PID, "uid", caller.UID,
				"gid", caller.GID, "path", caller.Path, "podUID", caller.PodUID)
			return nil, errNoEntry
		}
		rctx, cancel := context.WithTimeout(ctx, left)
		if err := s.cfg.Identities.Refresh(rctx); err != nil && rctx.Err() == nil {
			s.cfg.Logger.Warn("cannot refresh the entries for a waiting caller", "error", err)
		}
		cancel()
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		t := s.cfg.Clock.NewTimer(min(left, refreshEvery))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-changed:
		case <-t.C():
		}
		t.Stop()
	}
}

// matching returns the distinct IDs of the entries caller matches, sorted.
func matching(caller *attest.Caller, entries []Entry) []spiffeid.ID {
	var ids []spiffeid.ID
	for _, e := range entries {
		if caller.Matches(e.Selectors) && !slices.Contains(ids, e.ID) {
			ids = append(ids, e.ID)
		}
	}
	slices.SortFunc(ids, func(a, b spiffeid.ID) int { return strings.Compare(a.String(), b.String()) })
	return ids
}

// viewer is one stream's caller. Each View attests the caller again, so a
// view is never handed to a process other than the one attested, nor to
// one whose attributes no longer match.
type viewer struct {
	s       *Server
	peer    *attest.Peer
	started time.Time

	mu     sync.Mutex
	caller *attest.Caller
	ready  bool // a ready view was returned
}

func (v *viewer) View(ctx context.Context) (identity.View, <-chan struct{}, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.s
	caller, err := v.peer.Attest(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return identity.View{}, nil, status.FromContextError(ctx.Err()).Err()
		}
		s.cfg.Logger.Info("ending the stream of a caller that is gone", "pid", v.caller.PID, "error", err)
		return identity.View{}, nil, errGone
	}
	v.caller = caller
	entries, entriesChanged := s.cfg.Identities.Entries()
	ids := matching(caller, entries)
	if len(ids) == 0 {
		s.cfg.Logger.Info("ending the stream of a caller that matches no entry any more", "pid", caller.PID)
		return identity.View{}, nil, errNoEntry
	}
	waits := []<-chan struct{}{entriesChanged}
	svids := make([]*x509svid.SVID, 0, len(ids))
	var bundle *x509bundle.Bundle
	for _, id := range ids {
		st := s.cfg.Identities.Store(id)
		if st == nil {
			continue
		}
		snap, changed := st.Load()
		waits = append(waits, changed)
		svids = append(svids, snap.SVID)
		if bundle == nil {
			bundle = snap.Bundle
		}
	}
	view := identity.NewView(svids, bundle)
	next := s.cfg.AliveInterval
	switch {
	case view.Ready():
		v.ready = true
	case !v.ready:
		left := v.started.Add(s.cfg.PendingWait).Sub(s.cfg.Clock.Now())
		if left <= 0 {
			return identity.View{}, nil, errNotIssued
		}
		next = min(next, left)
	}
	return view, s.anyOf(ctx, waits, next), nil
}

// anyOf returns a channel closed when any of chans is, after d, or when ctx
// ends.
func (s *Server) anyOf(ctx context.Context, chans []<-chan struct{}, d time.Duration) <-chan struct{} {
	out := make(chan struct{})
	t := s.cfg.Clock.NewTimer(d)
	cases := make([]reflect.SelectCase, 0, len(chans)+2)
	cases = append(cases,
		reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
		reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(t.C())})
	for _, c := range chans {
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(c)})
	}
	go func() {
		defer close(out)
		defer t.Stop()
		reflect.Select(cases)
	}()
	return out
}
