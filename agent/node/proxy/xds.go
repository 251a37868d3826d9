package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
)

// workload is a validated Workload resource.
type workload struct {
	msg     *ambientv1.Workload
	id      spiffeid.ID
	addrs   []netip.Addr
	version string
	// arrived is when the workload first came in ambient mode: the start
	// of its capture window (trustmesh_node_proxy_capture_setup_seconds).
	arrived time.Time
}

func ambient(w *workload) bool {
	return w.msg.GetMode() == ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT
}

func (w *workload) has(a netip.Addr) bool {
	a = a.Unmap()
	for _, x := range w.addrs {
		if x == a {
			return true
		}
	}
	return false
}

// config is one consistent view of what the xDS server sent.
type config struct {
	workloads map[string]*workload // by uid
	byAddr    map[netip.Addr]*workload
	revision  string // the Authorization revision; "" until received
	authzVer  string
}

func (c *config) clone() *config {
	n := &config{workloads: make(map[string]*workload, len(c.workloads)), revision: c.revision, authzVer: c.authzVer}
	for k, v := range c.workloads {
		n.workloads[k] = v
	}
	return n
}

func (c *config) index() {
	c.byAddr = make(map[netip.Addr]*workload, len(c.workloads))
	for _, w := range c.workloads {
		for _, a := range w.addrs {
			c.byAddr[a] = w
		}
	}
}

func parseWorkload(r *discoveryv3.Resource) (*workload, error) {
	var m ambientv1.Workload
	if r.GetResource() == nil || r.GetResource().GetTypeUrl() != ambientv1.WorkloadType {
		return nil, fmt.Errorf("resource %q is not a %s", r.GetName(), ambientv1.WorkloadType)
	}
	if err := r.GetResource().UnmarshalTo(&m); err != nil {
		return nil, fmt.Errorf("workload %q: %w", r.GetName(), err)
	}
	if m.GetUid() == "" || m.GetUid() != r.GetName() {
		return nil, fmt.Errorf("workload %q: uid %q is not its resource name", r.GetName(), m.GetUid())
	}
	w := &workload{msg: &m, version: r.GetVersion()}
	if m.GetMode() != ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE || m.GetSpiffeId() != "" {
		id, err := spiffeid.FromString(m.GetSpiffeId())
		if err != nil {
			return nil, fmt.Errorf("workload %q: SPIFFE ID %q: %w", r.GetName(), m.GetSpiffeId(), err)
		}
		w.id = id
	}
	for _, s := range m.GetAddresses() {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("workload %q: address %q is not an IP address", r.GetName(), s)
		}
		w.addrs = append(w.addrs, a.Unmap())
	}
	return w, nil
}

// apply validates one delta response against c and returns the new config;
// nothing of a response that fails is applied.
func (c *config) apply(resp *discoveryv3.DeltaDiscoveryResponse, now time.Time) (*config, error) {
	n := c.clone()
	switch resp.GetTypeUrl() {
	case ambientv1.WorkloadType:
		for _, name := range resp.GetRemovedResources() {
			delete(n.workloads, name)
		}
		for _, r := range resp.GetResources() {
			w, err := parseWorkload(r)
			if err != nil {
				return nil, err
			}
			w.arrived = now
			if old := c.workloads[w.msg.GetUid()]; old != nil && ambient(old) && ambient(w) {
				w.arrived = old.arrived
			}
			n.workloads[w.msg.GetUid()] = w
		}
		seen := make(map[netip.Addr]string)
		for uid, w := range n.workloads {
			for _, a := range w.addrs {
				if other, ok := seen[a]; ok {
					return nil, fmt.Errorf("workloads %q and %q both claim address %s", other, uid, a)
				}
				seen[a] = uid
			}
		}
	case ambientv1.AuthorizationType:
		for _, name := range resp.GetRemovedResources() {
			if name == ambientv1.AuthorizationName {
				// Fail closed: without a revision nothing is re-checked
				// wrongly; the last one stays in force until a new one.
				n.authzVer = ""
			}
		}
		for _, r := range resp.GetResources() {
			if r.GetName() != ambientv1.AuthorizationName {
				return nil, fmt.Errorf("authorization resource %q, want %q", r.GetName(), ambientv1.AuthorizationName)
			}
			var m ambientv1.Authorization
			if r.GetResource() == nil || r.GetResource().GetTypeUrl() != ambientv1.AuthorizationType {
				return nil, fmt.Errorf("resource %q is not a %s", r.GetName(), ambientv1.AuthorizationType)
			}
			if err := r.GetResource().UnmarshalTo(&m); err != nil {
				return nil, fmt.Errorf("authorization: %w", err)
			}
			n.revision, n.authzVer = m.GetRevision(), r.GetVersion()
		}
	default:
		return nil, fmt.Errorf("unexpected type %q", resp.GetTypeUrl())
	}
	n.index()
	return n, nil
}

func (c *config) versions(typeURL string) map[string]string {
	v := map[string]string{}
	switch typeURL {
	case ambientv1.WorkloadType:
		for uid, w := range c.workloads {
			v[uid] = w.version
		}
	case ambientv1.AuthorizationType:
		if c.authzVer != "" {
			v[ambientv1.AuthorizationName] = c.authzVer
		}
	}
	return v
}

// NodeID is the node proxy's xDS node id.
func NodeID(ip, name, domain string) string {
	return ambientv1.NodeIDPrefix + ip + "~" + name + "~" + domain
}

// stream runs one delta ADS stream on conn until it fails or ctx ends,
// publishing every accepted config; got is set once a response was
// accepted, so that the caller can reset its backoff.
func (p *Proxy) stream(ctx context.Context, conn grpc.ClientConnInterface, got func()) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		return fmt.Errorf("opening the delta ADS stream: %w", err)
	}
	node := &corev3.Node{Id: p.nodeID, Cluster: "trustmesh-node"}
	cur := p.current()
	for _, t := range []string{ambientv1.WorkloadType, ambientv1.AuthorizationType} {
		// Wildcard subscriptions; what is held already is named so that
		// the server sends only changes and removals.
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: t, InitialResourceVersions: cur.versions(t)}); err != nil {
			return fmt.Errorf("subscribing to %s: %w", t, err)
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the xDS server ended the stream")
			}
			return fmt.Errorf("receiving: %w", err)
		}
		ack := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}
		next, err := p.current().apply(resp, p.cfg.Now())
		if err != nil {
			p.log.Warn("xDS: refusing a configuration (NACK); keeping the last good one", "type", resp.GetTypeUrl(), "error", err)
			ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
		} else {
			p.publish(next)
			got()
		}
		if err := s.Send(ack); err != nil {
			return fmt.Errorf("acknowledging: %w", err)
		}
	}
}

// runXDS keeps a stream open, reconnecting with backoff; the last good
// config stays in force while disconnected.
func (p *Proxy) runXDS(ctx context.Context) error {
	conn, err := p.cfg.dialXDS()
	if err != nil {
		return err
	}
	defer conn.Close()
	b := p.cfg.Backoff
	for {
		err := p.stream(ctx, conn, b.Reset)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := b.Next()
		p.log.Warn("xDS stream ended; keeping the last configuration and reconnecting", "address", p.cfg.XDSAddress, "in", d, "error", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
	}
}
