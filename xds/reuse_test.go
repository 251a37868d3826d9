package xds

import (
	"errors"
	"log/slog"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// reuseCluster is a plaintext static cluster: allowed on loopback (inside
// the pod), refused anywhere else.
func reuseCluster(host string, port uint32) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 "c",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(1e9),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
				}}},
			}}}},
		}}},
	}
}

func lockedInfo(g *generation, c *clusterv3.Cluster) *resInfo {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.infoOf(c)
}

// TestCheckedResourcesCarryOver: a generation reuses what the previous one
// checked only for resources of byte-identical content; a changed
// resource, one that failed, and one that merely shares a content key
// with a checked one are checked afresh and refused as before.
func TestCheckedResourcesCarryOver(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	g1 := newGeneration(nil, log)
	good := lockedInfo(g1, reuseCluster("127.0.0.1", 8080))
	if good.err != nil {
		t.Fatalf("loopback cluster refused: %v", good.err)
	}
	if bad := lockedInfo(g1, reuseCluster("10.0.0.1", 8080)); !errors.Is(bad.err, proxyconfig.ErrPlaintext) {
		t.Fatalf("plaintext cluster to 10.0.0.1: %v, want ErrPlaintext", bad.err)
	}

	g2 := newGeneration(nil, log)
	g2.carryFrom(g1)
	// A new message of the same content: carried over, not checked again.
	if got := lockedInfo(g2, reuseCluster("127.0.0.1", 8080)); got != good {
		t.Error("a byte-identical resource was checked again instead of carried over")
	}
	// Changed content: checked and marshalled afresh.
	changed := lockedInfo(g2, reuseCluster("127.0.0.1", 8081))
	if changed == good || changed.err != nil || changed.hash == good.hash {
		t.Errorf("changed resource: reused %t, error %v, version %s (old %s)", changed == good, changed.err, changed.hash, good.hash)
	}
	// A refused resource is never carried: it is refused again.
	if bad := lockedInfo(g2, reuseCluster("10.0.0.1", 8080)); !errors.Is(bad.err, proxyconfig.ErrPlaintext) {
		t.Errorf("plaintext cluster in the next generation: %v, want ErrPlaintext", bad.err)
	}

	// The content key only finds a candidate: a checked resource filed
	// under the key of a refused one (an FNV collision) is not reused.
	g3 := newGeneration(nil, log)
	g3.carryFrom(g1)
	evil := reuseCluster("10.0.0.2", 8080)
	_, a, err := marshalResource(evil)
	if err != nil {
		t.Fatal(err)
	}
	g3.carried[contentKey{typeURL: a.TypeUrl, sum: fnvSum(a.Value)}] = good
	if got := lockedInfo(g3, evil); got == good || !errors.Is(got.err, proxyconfig.ErrPlaintext) {
		t.Errorf("a resource whose content key collides with a checked one: reused %t, error %v", got == good, got.err)
	}
}
