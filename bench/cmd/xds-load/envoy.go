package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
)

// round is one thing every client must reach: round 0 is the cold connect
// (svc-0's first two endpoints), round R the mesh with R more endpoints.
type round struct {
	n     int
	want  string
	start time.Time
	// at[i] is when client i first held want, in ns after start; 0: not yet.
	at   []atomic.Int64
	left atomic.Int64
	done chan struct{}
}

func newRound(n, clients int, want string) *round {
	r := &round{n: n, want: want, start: time.Now(), at: make([]atomic.Int64, clients), done: make(chan struct{})}
	r.left.Store(int64(clients))
	return r
}

// fleet is the simulated Envoys' shared state: the current round, and the
// last svc-0 endpoint set each client received, to name a disagreement.
type fleet struct {
	cur  atomic.Pointer[round]
	last []atomic.Pointer[string]
}

// observe records that client i now holds svc-0 endpoint set set; seen is
// the last round the client reached.
func (f *fleet) observe(i int, seen *int, set string) {
	f.last[i].Store(&set)
	r := f.cur.Load()
	if r == nil || r.n <= *seen || set != r.want {
		return
	}
	*seen = r.n
	r.at[i].Store(max(1, int64(time.Since(r.start))))
	if r.left.Add(-1) == 0 {
		close(r.done)
	}
}

// disagreeing counts, among clients that did not reach r, the svc-0
// endpoint sets they last received.
func (f *fleet) disagreeing(r *round) map[string]int {
	out := map[string]int{}
	for i := range r.at {
		if r.at[i].Load() != 0 {
			continue
		}
		s := "(nothing)"
		if p := f.last[i].Load(); p != nil {
			s = *p
		}
		out[s]++
	}
	return out
}

var types = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType}

// claName is a ClusterLoadAssignment's cluster_name (field 1), read
// without decoding the rest.
func claName(b []byte) string {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return ""
			}
			return string(v)
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return ""
		}
		b = b[n:]
	}
	return ""
}

// claSet is the endpoint set of an encoded ClusterLoadAssignment: the
// socket address and port of each of its endpoints (endpoints, field 2;
// lb_endpoints, 2; endpoint, 1; address, 1; socket_address, 1; its
// address, 2, and port_value, 3), read off the wire as proto.Unmarshal
// would read them (a singular field given twice: the last wins), without
// building the rest of the message: decoding all of it into Go structs
// was a sixteenth of this tool's CPU during pushes at 20,000 clients, CPU
// the server it measures shares. An endpoint with no socket address
// counts as ":0", as its getters would give; anything that does not
// parse is an error.
func claSet(b []byte) (string, error) {
	var addrs []string
	err := walk(b, field(2, func(locality []byte) error {
		return walk(locality, field(2, func(lb []byte) error {
			var addr string
			var port uint64
			err := walk(lb, field(1, func(ep []byte) error {
				return walk(ep, field(1, func(a []byte) error {
					return walk(a, field(1, func(sa []byte) error {
						return walk(sa, func(num protowire.Number, v []byte, x uint64) error {
							switch num {
							case 2:
								addr = string(v)
							case 3:
								port = x
							}
							return nil
						})
					}))
				}))
			}))
			addrs = append(addrs, net.JoinHostPort(addr, strconv.FormatUint(uint64(uint32(port)), 10)))
			return err
		}))
	}))
	if err != nil {
		return "", fmt.Errorf("xds-load: decoding %s: %w", svc0Cluster, err)
	}
	return endpointSet(addrs), nil
}

// walk calls f with each field of a message: a bytes field's value as v,
// a varint field's as x.
func walk(b []byte, f func(num protowire.Number, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errTruncated
		}
		b = b[n:]
		var (
			v []byte
			x uint64
		)
		switch typ {
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return errTruncated
		}
		b = b[n:]
		if err := f(num, v, x); err != nil {
			return err
		}
	}
	return nil
}

// field is a walk callback that calls f with each value of the bytes
// field num.
func field(num protowire.Number, f func([]byte) error) func(protowire.Number, []byte, uint64) error {
	return func(n protowire.Number, v []byte, _ uint64) error {
		if n != num || v == nil {
			return nil
		}
		return f(v)
	}
}

func sotwClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, observe func(string)) error {
	s, err := c.StreamAggregatedResources(ctx, grpc.WaitForReady(true), grpc.ForceCodecV2(newEnvoyCodec()))
	if err != nil {
		return err
	}
	for _, typ := range types {
		req := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNames = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		req := &discoveryv3.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
		if resp.GetTypeUrl() == resource.RouteType {
			req.ResourceNames = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
		if resp.GetTypeUrl() != resource.EndpointType {
			continue
		}
		// State of the world: an answer without svc-0 removes it.
		set := ""
		for _, a := range resp.GetResources() {
			if claName(a.GetValue()) == svc0Cluster {
				if set, err = claSet(a.GetValue()); err != nil {
					return err
				}
				break
			}
		}
		observe(set)
	}
}

func deltaClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, observe func(string)) error {
	s, err := c.DeltaAggregatedResources(ctx, grpc.WaitForReady(true), grpc.ForceCodecV2(newEnvoyCodec()))
	if err != nil {
		return err
	}
	for _, typ := range types {
		req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNamesSubscribe = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
		if resp.GetTypeUrl() != resource.EndpointType {
			continue
		}
		// Delta: only what changed; svc-0 is either updated or removed.
		for _, r := range resp.GetResources() {
			if r.GetName() == svc0Cluster {
				set, err := claSet(r.GetResource().GetValue())
				if err != nil {
					return err
				}
				observe(set)
			}
		}
		for _, name := range resp.GetRemovedResources() {
			if name == svc0Cluster {
				observe("")
			}
		}
	}
}
