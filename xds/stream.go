package xds

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// Errors that refuse a stream. statusOf maps them to gRPC codes.
var (
	// ErrUnauthenticated: no client certificate, or one that does not
	// verify against the trust bundle.
	ErrUnauthenticated = errors.New("xds: no valid trustmesh client certificate")
	// ErrNotWorkload: the certificate's SPIFFE ID is not
	// spiffe://TD/ns/NS/sa/SA, nor, for a node proxy, spiffe://TD/node/NAME.
	ErrNotWorkload = errors.New("xds: the client certificate does not name a workload")
	// ErrNodeMismatch: the node's namespace or service account is not the
	// certificate's, a node proxy's name is not its certificate's, a
	// workload's certificate asks as a node proxy or a node's as a
	// workload, or the node changed on the stream.
	ErrNodeMismatch = errors.New("xds: node identity does not match the client certificate")
	// ErrUnknownStream: a request on a stream that was never opened.
	ErrUnknownStream = errors.New("xds: unknown stream")
	// ErrTooMany: the SPIFFE ID already has as many streams, or node ids,
	// as it is allowed.
	ErrTooMany = errors.New("xds: too many streams or nodes for one identity")
)

// statusOf maps refusals to gRPC status, the one place the server does.
func statusOf(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrUnauthenticated):
		return status.Error(codes.Unauthenticated, err.Error())
	case errors.Is(err, ErrNotWorkload), errors.Is(err, ErrNodeMismatch), errors.Is(err, proxyconfig.ErrIdentity),
		errors.Is(err, proxyconfig.ErrUnknownWorkload), errors.Is(err, proxyconfig.ErrAmbientWorkload):
		return status.Error(codes.PermissionDenied, err.Error())
	case errors.Is(err, proxyconfig.ErrNodeID):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrTooMany):
		return status.Error(codes.ResourceExhausted, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// Identity is a verified workload identity, or a node proxy's.
type Identity struct {
	ID             spiffeid.ID
	Namespace      string
	ServiceAccount string
	// Node is the node name of a node proxy's certificate,
	// spiffe://TD/node/NAME; empty for a workload, whose Namespace and
	// ServiceAccount are then set.
	Node string
}

// streamKey names an open stream. go-control-plane numbers its state of
// the world and its delta streams with two counters that both start at 1,
// so a stream ID alone names two streams at once: the kind is part of the
// key, or closing a delta stream would free the caps held by the state of
// the world stream with the same number.
type streamKey struct {
	delta bool
	id    int64
}

func sotwKey(id int64) streamKey  { return streamKey{id: id} }
func deltaKey(id int64) streamKey { return streamKey{delta: true, id: id} }

// stream is one ADS stream's verified identity and node.
type stream struct {
	identity Identity

	mu   sync.Mutex
	node *client
	// sent is the last version sent per type, acked the last one the
	// node acknowledged (state of the world).
	sent, acked map[string]string
	// opened is when the stream opened; pendingSince when the oldest
	// version not yet acknowledged was sent, zero when none is (Clients).
	opened, pendingSince time.Time
}

// Authenticate verifies the peer certificate of a stream's connection
// against the current trust bundle at the server's clock, and returns the
// workload identity it names, or the node a node proxy's names.
func (s *Server) Authenticate(ctx context.Context) (Identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Identity{}, fmt.Errorf("%w: no peer", ErrUnauthenticated)
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return Identity{}, fmt.Errorf("%w: no client certificate", ErrUnauthenticated)
	}
	id, _, err := x509svid.Verify(info.State.PeerCertificates, s.cfg.Bundle, x509svid.WithTime(s.cfg.Clock.Now()))
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	if id.TrustDomain() != s.td {
		return Identity{}, fmt.Errorf("%w: %s is outside trust domain %s", ErrUnauthenticated, id, s.td)
	}
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) == 2 && parts[0] == "node" && parts[1] != "" {
		return Identity{ID: id, Node: parts[1]}, nil
	}
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || parts[1] == "" || parts[3] == "" {
		return Identity{}, fmt.Errorf("%w: %s", ErrNotWorkload, id)
	}
	return Identity{ID: id, Namespace: parts[1], ServiceAccount: parts[3]}, nil
}

func (s *Server) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(ctx context.Context, id int64, _ string) error {
			return s.open(ctx, sotwKey(id))
		},
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, _ string) error {
			return s.open(ctx, deltaKey(id))
		},
		StreamRequestFunc: func(id int64, req *discoveryv3.DiscoveryRequest) error {
			if err := s.request(sotwKey(id), req.GetNode()); err != nil {
				return err
			}
			keepNodeID(req.GetNode())
			s.nack(sotwKey(id), req)
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
			if st := s.stream(sotwKey(id)); st != nil {
				st.mu.Lock()
				st.sent[resp.GetTypeUrl()] = resp.GetVersionInfo()
				if st.pendingSince.IsZero() {
					st.pendingSince = s.cfg.Clock.Now()
				}
				st.mu.Unlock()
			}
		},
		StreamDeltaRequestFunc: func(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
			if err := s.request(deltaKey(id), req.GetNode()); err != nil {
				return err
			}
			keepNodeID(req.GetNode())
			s.cache.deltaRequest(id, req)
			return nil
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discoveryv3.DeltaDiscoveryRequest, resp *discoveryv3.DeltaDiscoveryResponse) {
			s.metrics.pushed(resp.GetTypeUrl())
		},
		StreamClosedFunc: func(id int64, _ *corev3.Node) { s.closed(sotwKey(id)) },
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) {
			s.cache.deltaClosed(id)
			s.closed(deltaKey(id))
		},
		FetchRequestFunc: func(context.Context, *discoveryv3.DiscoveryRequest) error {
			return status.Error(codes.Unimplemented, "xds: only ADS streams are served")
		},
	}
}

func (s *Server) open(ctx context.Context, id streamKey) error {
	ident, err := s.Authenticate(ctx)
	if err != nil {
		s.log.Warn("xds stream refused", "error", err)
		return statusOf(err)
	}
	// Wait for the first load, so that the first request gets a snapshot.
	select {
	case <-s.ready:
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
	s.mu.Lock()
	use := s.useLocked(ident.ID)
	if open, limit := use.streams, s.cfg.MaxStreamsPerIdentity*s.podsLocked(ident.ID); open >= limit {
		s.mu.Unlock()
		err := fmt.Errorf("%w: %s has %d streams open", ErrTooMany, ident.ID, open)
		s.log.Warn("xds stream refused", "error", err)
		return statusOf(err)
	}
	use.streams++
	s.mu.Unlock()
	s.streams.Store(id, &stream{identity: ident, sent: map[string]string{}, acked: map[string]string{}, opened: s.cfg.Clock.Now()})
	s.metrics.streams(1)
	return nil
}

// useLocked returns what a SPIFFE ID holds. s.mu is held.
func (s *Server) useLocked(id spiffeid.ID) *identityUse {
	u := s.perID[id]
	if u == nil {
		u = &identityUse{}
		s.perID[id] = u
	}
	return u
}

// forgetLocked drops an identity that holds nothing. s.mu is held.
func (s *Server) forgetLocked(id spiffeid.ID) {
	if u := s.perID[id]; u != nil && u.streams == 0 && u.nodes == 0 {
		delete(s.perID, id)
	}
}

// podsLocked is how many pods the mesh lists under a SPIFFE ID, at least
// one: the per-identity caps are per pod, so that the replicas of a
// Deployment, which share a service account, each have their own.
// s.mu is held.
func (s *Server) podsLocked(id spiffeid.ID) int {
	return max(1, s.gen.pods(id))
}

func (s *Server) stream(id streamKey) *stream {
	v, ok := s.streams.Load(id)
	if !ok {
		return nil
	}
	return v.(*stream)
}

// request checks the node on every request of a stream: the first names
// it (and it must match the certificate: a workload's proxy its namespace
// and service account, a node proxy its node), later ones may repeat it
// but not change it.
func (s *Server) request(id streamKey, n *corev3.Node) error {
	st := s.stream(id)
	if st == nil {
		return statusOf(ErrUnknownStream)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.node != nil {
		if n != nil && n.GetId() != st.node.ID {
			return statusOf(fmt.Errorf("%w: the stream's node changed from %s to %s", ErrNodeMismatch, st.node.ID, n.GetId()))
		}
		return nil
	}
	pn, err := parseClient(st.identity, n)
	if err != nil {
		s.log.Warn("xds stream refused", "peer", st.identity.ID.String(), "error", err)
		return statusOf(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if pn.proxy != nil {
		// The pod must be the mesh's, of the certificate's service
		// account, and have a sidecar (an ambient pod's node proxy
		// carries its traffic). The configuration is built once for the
		// publish below.
		_, _, err := s.gen.publish(pn)
		if errors.Is(err, proxyconfig.ErrUnknownWorkload) || errors.Is(err, proxyconfig.ErrIdentity) || errors.Is(err, proxyconfig.ErrAmbientWorkload) {
			s.log.Warn("xds stream refused", "peer", st.identity.ID.String(), "node", pn.ID, "error", err)
			return statusOf(err)
		}
	}
	if prev, ok := s.nodes[pn.ID]; ok {
		prev.streams++
		st.node = prev.node
		return nil
	}
	use := s.useLocked(st.identity.ID)
	if limit := s.cfg.MaxNodesPerIdentity * s.podsLocked(st.identity.ID); use.nodes >= limit {
		err := fmt.Errorf("%w: %s has %d node ids registered", ErrTooMany, st.identity.ID, use.nodes)
		s.log.Warn("xds stream refused", "node", pn.ID, "error", err)
		return statusOf(err)
	}
	use.nodes++
	st.node = pn
	s.nodes[pn.ID] = &nodeState{node: pn, id: st.identity.ID, streams: 1}
	s.publishLocked(pn)
	return nil
}

// keepNodeID empties a request's node but for its id, once request has
// checked it. go-control-plane keeps the last node a stream sent for as
// long as the stream is open (the state of the world server keeps this
// very message; the delta server takes it from the request after the
// callback), and the cache keeps each type's last request; what the
// server needs of a node it parsed on the stream's first request
// (stream.node), and later requests are checked against it by id alone.
// An Envoy's node metadata runs to kilobytes, held once per stream for
// nothing. This relies on go-control-plane (v0.14.0) keeping the
// request's own node message, not a copy: TestServerKeepsOnlyTheNodeID
// fails if a version bump changes that.
func keepNodeID(n *corev3.Node) {
	if n == nil {
		return
	}
	id := n.GetId()
	proto.Reset(n)
	n.Id = id
}

// nack handles a state-of-the-world NACK: the client rejected the version
// it was sent and asks with its previous one, which would make the cache
// send the rejected version again at once, in a loop. The request is
// marked as holding the rejected version, so the client waits for the next
// one, and the rejection is logged.
func (s *Server) nack(id streamKey, req *discoveryv3.DiscoveryRequest) {
	st := s.stream(id)
	if st == nil {
		return
	}
	if req.GetErrorDetail() == nil {
		if req.GetResponseNonce() != "" {
			st.mu.Lock()
			st.acked[req.GetTypeUrl()] = req.GetVersionInfo()
			if maps.Equal(st.sent, st.acked) {
				st.pendingSince = time.Time{}
			}
			st.mu.Unlock()
		}
		return
	}
	st.mu.Lock()
	rejected := st.sent[req.GetTypeUrl()]
	st.mu.Unlock()
	s.log.Warn("xds configuration rejected by a node", "node", req.GetNode().GetId(), "type", req.GetTypeUrl(),
		"version", rejected, "error", req.GetErrorDetail().GetMessage())
	req.VersionInfo = rejected
}

func (s *Server) closed(id streamKey) {
	st := s.stream(id)
	if st == nil {
		return
	}
	s.streams.Delete(id)
	s.metrics.streams(-1)
	st.mu.Lock()
	defer st.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if use := s.perID[st.identity.ID]; use != nil {
		use.streams--
		defer s.forgetLocked(st.identity.ID)
	}
	if st.node == nil {
		return
	}
	ns := s.nodes[st.node.ID]
	if ns == nil {
		return
	}
	if ns.streams--; ns.streams == 0 {
		delete(s.nodes, st.node.ID)
		s.cache.clear(st.node.ID)
		if use := s.perID[ns.id]; use != nil {
			use.nodes--
		}
	}
}

// Synced reports whether a node is connected over state of the world and
// has acknowledged the current version of every type it was sent, as
// istioctl proxy-status calls SYNCED (Clients).
func (s *Server) Synced(nodeID string) bool {
	c := s.clients(nodeID)
	return len(c) == 1 && c[0].Synced
}
