package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
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
// without decoding the rest, the last one given winning as when decoding:
// the state-of-the-world answer holds every service's assignment, and only
// svc-0's is decoded (by claSet, which checks the name again).
func claName(b []byte) string {
	name := ""
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
			name = string(v)
			b = b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return ""
		}
		b = b[n:]
	}
	return name
}

// claSet is the endpoint set of svc-0's encoded ClusterLoadAssignment: the
// socket address and port of each of its endpoints, as proto.Unmarshal of
// the whole message reads them (an endpoint with no socket address counts
// as ":0", as its getters give); a message that does not decode, or names
// another cluster, is an error. Every client of a generation is sent the
// same bytes (the server's shared encoding), so the result is memoised by
// the exact bytes: each distinct encoding is decoded once, in full, and
// every client still checks exactly what it received. Decoding it per
// client was a sixteenth of this tool's CPU during pushes at 20,000
// clients, CPU the server it measures shares.
func claSet(b []byte) (string, error) {
	claMemo.Lock()
	set, ok := claMemo.m[string(b)]
	claMemo.Unlock()
	if ok {
		return set, nil
	}
	var cla endpointv3.ClusterLoadAssignment
	if err := proto.Unmarshal(b, &cla); err != nil {
		return "", fmt.Errorf("xds-load: decoding %s: %w", svc0Cluster, err)
	}
	if cla.GetClusterName() != svc0Cluster {
		return "", fmt.Errorf("xds-load: %s's assignment names cluster %q", svc0Cluster, cla.GetClusterName())
	}
	var addrs []string
	for _, l := range cla.GetEndpoints() {
		for _, e := range l.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), strconv.FormatUint(uint64(sa.GetPortValue()), 10)))
		}
	}
	set = endpointSet(addrs)
	claMemo.Lock()
	if len(claMemo.m) >= claMemoMax {
		clear(claMemo.m)
	}
	claMemo.m[string(b)] = set
	claMemo.Unlock()
	return set, nil
}

// claMemoMax bounds claMemo: a run has a few distinct svc-0 encodings per
// round (one per generation the clients are sent).
const claMemoMax = 64

// claMemo holds the endpoint sets of the svc-0 assignments already
// decoded, by their exact bytes. Only what decoded is kept: a bad encoding
// is decoded, and refused, by every client it reaches.
var claMemo = struct {
	sync.Mutex
	m map[string]string
}{m: map[string]string{}}

// sendFailure is the error a failed Send stands for. grpc-go's Send
// returns io.EOF once the server has ended the stream, as when it refuses
// it before reading a request; the stream's status comes only from Recv.
// Without this, a refusal that lands before the client's Send reads as an
// ordinary end of stream and is reopened without Envoy's backoff.
func sendFailure(err error, recv func() error) error {
	if !errors.Is(err, io.EOF) {
		return err
	}
	if rerr := recv(); rerr != nil {
		return rerr
	}
	return err
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
			return sendFailure(err, func() error { _, err := s.Recv(); return err })
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
			return sendFailure(err, func() error { _, err := s.Recv(); return err })
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
			return sendFailure(err, func() error { _, err := s.Recv(); return err })
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return sendFailure(err, func() error { _, err := s.Recv(); return err })
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
