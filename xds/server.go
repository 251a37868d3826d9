// Package xds is trustmesh's xDS server: one go-control-plane ADS server,
// state-of-the-world and delta, that configures injected Envoys, ingress
// and egress gateways and proxyless grpc-go clients with strict mTLS only,
// from the mesh model and the AuthorizationPolicies, and the node proxies
// of ambient mode with trustmesh's own resources (ambient.go).
//
// It shares the CA's port (:15012, as istiod does). That port requests
// client certificates without verifying them in the handshake, so every
// stream is authenticated here: the peer's chain must verify against the
// current trust bundle (else codes.Unauthenticated), and the node's
// namespace and service account must be those of the SPIFFE ID in it, a
// node proxy's node name that of its node SVID (else
// codes.PermissionDenied). Identity is per service account: pods that share
// one may read each other's configuration.
//
// Each node gets its own snapshot, built by package xds/proxyconfig from
// shared parts; every resource passes ValidateAll and the strict-mTLS
// check, and every snapshot the consistency check, before it is published.
// Changes to the mesh or the policies are debounced on the injected clock
// and pushed with per-type (state-of-the-world) and per-resource (delta)
// versions, so proxies receive only what changed.
package xds

import (
	"context"
	"errors"
	"fmt"
	"github.com/prometheus/client_golang/prometheus"
	"log/slog"
	"slices"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// PolicyFeed publishes the AuthorizationPolicies in force as versioned,
// immutable snapshots; authz/source.Feed is one. The server reads and
// watches no policy files of its own: it follows the feed that ext_authz
// follows, so both enforce the same snapshot.
type PolicyFeed interface {
	// Watch returns once the feed's first snapshot is out, then calls
	// changed after every new snapshot until ctx ends. The channel
	// receives the watch's final error: nil when ctx ended.
	Watch(ctx context.Context, changed func()) (<-chan error, error)
	// Policies returns the snapshot in force: its version and its
	// policies, which the caller must not modify.
	Policies() (version uint64, ps []*policy.Policy)
}

// Config configures the xDS server.
type Config struct {
	// Bundle is the trust bundle clients' certificates must chain to
	// (*authority.Authority in ca/authority).
	Bundle x509bundle.Source
	// Mesh is the mesh model; Policies the AuthorizationPolicy feed (nil:
	// no policy, so proxyless servers allow every mesh peer).
	Mesh     mesh.Source
	Policies PolicyFeed
	// Proxy configures the generated resources; its TrustDomain is the
	// mesh's.
	Proxy proxyconfig.Config
	// Debounce is how long changes must settle before a push; MaxDelay
	// bounds how long a stream of changes can hold one back.
	Debounce, MaxDelay time.Duration
	// InitialPushes bounds how many nodes are sent a new version at once,
	// their first configuration or a push (state of the world); the rest
	// wait in order as those acknowledge. Zero means DefaultInitialPushes.
	InitialPushes int
	// FirstPushHold is how long a node may hold one of those slots
	// without acknowledging what it was sent; zero means
	// DefaultFirstPushHold.
	FirstPushHold time.Duration
	// MaxStreamsPerIdentity and MaxNodesPerIdentity cap the open streams
	// and the distinct node ids of one SPIFFE ID, per pod the mesh lists
	// under it (so replicas sharing a service account each have their
	// own allowance); zero means DefaultMaxStreamsPerIdentity and
	// DefaultMaxNodesPerIdentity.
	MaxStreamsPerIdentity int
	MaxNodesPerIdentity   int
	Clock                 clock.WithTicker
	Log                   *slog.Logger
	// Registerer, when set, receives the server's Prometheus metrics.
	Registerer prometheus.Registerer
	// TracerProvider, when set, traces each node's push (xds.push). Nil
	// turns tracing off.
	TracerProvider trace.TracerProvider
}

// Defaults of Config.
const (
	DefaultDebounce              = 100 * time.Millisecond
	DefaultMaxDelay              = time.Second
	DefaultMaxStreamsPerIdentity = 8
	DefaultMaxNodesPerIdentity   = 4
)

// ErrConfig marks an invalid configuration.
var ErrConfig = errors.New("xds: invalid configuration")

func (c Config) validate() (Config, error) {
	var errs []error
	if c.Debounce <= 0 {
		c.Debounce = DefaultDebounce
	}
	if c.MaxDelay <= 0 {
		c.MaxDelay = DefaultMaxDelay
	}
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.MaxStreamsPerIdentity <= 0 {
		c.MaxStreamsPerIdentity = DefaultMaxStreamsPerIdentity
	}
	if c.MaxNodesPerIdentity <= 0 {
		c.MaxNodesPerIdentity = DefaultMaxNodesPerIdentity
	}
	if c.InitialPushes < 0 || c.FirstPushHold < 0 {
		errs = append(errs, fmt.Errorf("%w: initial pushes and their hold time may not be negative", ErrConfig))
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Bundle == nil {
		errs = append(errs, fmt.Errorf("%w: a trust bundle source is required", ErrConfig))
	}
	if c.Mesh == nil {
		errs = append(errs, fmt.Errorf("%w: a mesh source is required", ErrConfig))
	}
	var err error
	if c.Proxy, err = c.Proxy.WithDefaults(); err != nil {
		errs = append(errs, fmt.Errorf("xds: %w", err))
	}
	return c, errors.Join(errs...)
}

// Server is the xDS server.
type Server struct {
	cfg   Config
	td    spiffeid.TrustDomain
	log   *slog.Logger
	cache *cache
	ads   serverv3.Server
	stop  context.CancelFunc

	mu  sync.Mutex
	gen *generation
	// policyVersion is the version of the policy snapshot gen was built
	// from.
	policyVersion uint64
	refusals      map[string]bool
	nodes         map[string]*nodeState // by node id
	// perID counts the open streams and the registered node ids of each
	// SPIFFE ID, for the per-identity caps.
	perID   map[spiffeid.ID]*identityUse
	ready   chan struct{}
	metrics *metrics
	// streams are the open streams by key. Stream callbacks take streams
	// and the stream's own lock, and s.mu only to register a node.
	streams sync.Map // streamKey -> *stream
	pushes  uint64
	// tracer is nil when tracing is off.
	tracer trace.Tracer
}

type nodeState struct {
	node    *client
	id      spiffeid.ID
	streams int
}

type identityUse struct {
	streams, nodes int
}

// New validates cfg and returns a Server. It serves nothing until Run has
// loaded the mesh and policies: until then streams wait.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:      cfg,
		td:       cfg.Proxy.TrustDomain,
		log:      cfg.Log.With("component", "xds"),
		metrics:  newMetrics(cfg.Registerer),
		refusals: map[string]bool{},
		nodes:    map[string]*nodeState{},
		perID:    map[spiffeid.ID]*identityUse{},
		ready:    make(chan struct{}),
	}
	if cfg.TracerProvider != nil {
		s.tracer = cfg.TracerProvider.Tracer(TracerName)
	}
	s.cache = newCache(cfg.InitialPushes, cfg.FirstPushHold, cfg.Clock)
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.ads = serverv3.NewServer(ctx, s.cache, s.callbacks())
	return s, nil
}

// Register adds the Aggregated Discovery Service (state-of-the-world and
// delta) to a gRPC server, such as the CA's.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(r, s.ads)
}

// Ready is closed once the first mesh and policy set are loaded.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Run loads the mesh and the policies, failing if the first load fails,
// then pushes every change (debounced) until ctx ends. Open streams end
// when Run returns.
func (s *Server) Run(ctx context.Context) error {
	defer s.stop()
	defer s.cache.stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kick := make(chan struct{}, 1)
	changed := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	var watches []<-chan error
	meshW, err := s.cfg.Mesh.Watch(ctx, changed)
	if err != nil {
		return fmt.Errorf("xds: watching the mesh: %w", err)
	}
	watches = append(watches, meshW)
	if s.cfg.Policies != nil {
		polW, err := s.cfg.Policies.Watch(ctx, changed)
		if err != nil {
			cancel()
			<-meshW
			return fmt.Errorf("xds: watching policies: %w", err)
		}
		watches = append(watches, polW)
	}
	waitWatches := func() {
		cancel()
		for _, w := range watches {
			<-w
		}
	}
	if err := s.reload(true); err != nil {
		waitWatches()
		return err
	}
	close(s.ready)

	errc := make(chan error, len(watches))
	for _, w := range watches {
		go func() { errc <- <-w }()
	}
	// remaining counts the watches that have not ended; shutdown waits for
	// exactly those, whichever order the ends and ctx arrive in.
	remaining := len(watches)
	drain := func() {
		cancel()
		for ; remaining > 0; remaining-- {
			<-errc
		}
	}
	var (
		settle, deadline clock.Timer
		fire, force      <-chan time.Time
	)
	stopTimers := func() {
		for _, t := range []clock.Timer{settle, deadline} {
			if t != nil {
				t.Stop()
			}
		}
		settle, deadline, fire, force = nil, nil, nil, nil
	}
	defer stopTimers()
	for {
		select {
		case <-ctx.Done():
			drain()
			return nil
		case err := <-errc:
			remaining--
			if err == nil && ctx.Err() != nil {
				// Ended because ctx did; the next turn returns.
				continue
			}
			drain()
			if err == nil {
				// A source that stops watching while the server runs would
				// leave its proxies on stale configuration: fail instead.
				return errors.New("xds: a watch ended while the server was running")
			}
			return fmt.Errorf("xds: watch failed: %w", err)
		case <-kick:
			if settle != nil {
				settle.Stop()
			}
			settle = s.cfg.Clock.NewTimer(s.cfg.Debounce)
			fire = settle.C()
			if deadline == nil {
				deadline = s.cfg.Clock.NewTimer(s.cfg.MaxDelay)
				force = deadline.C()
			}
		case <-fire:
			stopTimers()
			_ = s.reload(false)
		case <-force:
			stopTimers()
			_ = s.reload(false)
		}
	}
}

// ErrMesh wraps a mesh that could not be loaded or is invalid; the last
// good mesh stays in force.
var ErrMesh = errors.New("xds: mesh refused, last good mesh kept")

// ErrPolicies wraps policies that could not be loaded (Dump).
var ErrPolicies = errors.New("xds: policies refused, last good set kept")

// reload reads the mesh and the policy snapshot in force and pushes to
// every node. On the first load a mesh error is fatal; later, the previous
// mesh stays in force. The feed publishes only policies that parsed, so
// there is no policy error to handle here.
func (s *Server) reload(first bool) error {
	m, merr := s.cfg.Mesh.Mesh()
	if merr == nil {
		merr = m.Validate(s.td)
	}
	var (
		version uint64
		ps      []*policy.Policy
	)
	if s.cfg.Policies != nil {
		version, ps = s.cfg.Policies.Policies()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if merr != nil {
		merr = fmt.Errorf("%w: %w", ErrMesh, merr)
		s.log.Error("mesh update refused; last good mesh kept", "error", merr)
		if first || s.gen == nil {
			return merr
		}
		m = s.gen.builder.Mesh()
	}
	s.policyVersion = version
	s.logRefusals(m)
	prev := s.gen
	s.gen = newGeneration(proxyconfig.NewBuilder(s.cfg.Proxy, m, ps), s.log)
	s.gen.carryFrom(prev)
	s.gen.policyVersion = version
	s.pushes++
	for _, ns := range s.nodes {
		s.publishLocked(ns.node)
	}
	s.log.Info("xds configuration pushed", "services", len(m.Services), "policies", len(ps),
		"policy_version", version, "nodes", len(s.nodes))
	return merr
}

func (s *Server) logRefusals(m *mesh.Mesh) {
	now := map[string]bool{}
	for _, r := range m.Refusals {
		now[r.String()] = true
		if !s.refusals[r.String()] {
			s.log.Warn("refused and not honoured", "object", r.Object, "reason", r.Reason)
		}
	}
	s.refusals = now
}

// publishLocked computes and sets the node's snapshot. A node whose
// resources fail a check is sent nothing new: it keeps its last good
// configuration rather than receive a bad one.
func (s *Server) publishLocked(n *client) {
	span := s.startPush(n.ID)
	defer span.End()
	pub, _, err := s.gen.publish(n)
	if err != nil {
		span.SetStatus(codes.Error, "configuration refused")
		s.log.Error("refusing to publish a node's configuration", "node", n.ID, "error", err)
		return
	}
	pushed(span, pub)
	if err := s.cache.set(n.ID, pub); err != nil {
		s.log.Error("setting a snapshot", "node", n.ID, "error", err)
	}
}

// Resources computes a node's resources as the server would publish them,
// without registering the node (for `trustmesh xds dump`).
func (s *Server) Resources(n *corev3.Node) (*proxyconfig.Resources, error) {
	pn, err := proxyconfig.ParseNode(n)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	gen := s.gen
	s.mu.Unlock()
	if gen == nil {
		return nil, errors.New("xds: not loaded yet")
	}
	return gen.nodeResources(pn)
}

// PolicyVersion is the version of the policy snapshot that the
// configuration last pushed was built from; 0 without a policy feed or
// before the first push.
func (s *Server) PolicyVersion() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policyVersion
}

// Pushes counts the configurations pushed: the first load and every
// debounced change since.
func (s *Server) Pushes() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pushes
}

// Nodes returns the ids of the connected nodes, sorted.
func (s *Server) Nodes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.nodes))
	for id := range s.nodes {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}
