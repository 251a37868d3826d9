package proxyconfig_test

import (
	"errors"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// sidecar builds a small mesh's sidecar resources to mutate.
func sidecar(t *testing.T) *proxyconfig.Resources {
	t.Helper()
	w := &mesh.Workload{Namespace: "ns-a", Name: "pod-0", ServiceAccount: "sa-0", ID: spiffeid.RequireFromSegments(td, "ns", "ns-a", "sa", "sa-0")}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "ns-a", Name: "web", Hostname: "web.ns-a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}, {Name: "db", Port: 5432, Protocol: mesh.TCP}},
		Endpoints: []mesh.Endpoint{{Address: "10.0.0.1", Workload: w}},
	}}}
	n, err := proxyconfig.ParseNode(meshtest.Node("sidecar", "10.0.0.1", w, false))
	if err != nil {
		t.Fatal(err)
	}
	res, err := proxyconfig.NewBuilder(testConfig(t), m, nil).Build(n)
	if err != nil {
		t.Fatal(err)
	}
	// Deep copies: the builder shares what it returns.
	out := &proxyconfig.Resources{}
	for _, l := range res.Listeners {
		out.Listeners = append(out.Listeners, proto.Clone(l).(*listenerv3.Listener))
	}
	for _, c := range res.Clusters {
		out.Clusters = append(out.Clusters, proto.Clone(c).(*clusterv3.Cluster))
	}
	return out
}

func find[T interface{ GetName() string }](xs []T, name string) T {
	for _, x := range xs {
		if x.GetName() == name {
			return x
		}
	}
	panic("no " + name)
}

// TestCheckStrictRefuses shows the guard refusing each way plaintext could
// leave the pod or an unauthenticated peer get in.
func TestCheckStrictRefuses(t *testing.T) {
	cases := map[string]func(r *proxyconfig.Resources){
		"cluster without TLS": func(r *proxyconfig.Resources) {
			find(r.Clusters, "outbound|80||web.ns-a.svc.cluster.local").TransportSocket = nil
		},
		"cluster without SAN matcher": func(r *proxyconfig.Resources) {
			c := find(r.Clusters, "outbound|80||web.ns-a.svc.cluster.local")
			up := &tlsv3.UpstreamTlsContext{}
			_ = c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up)
			up.GetCommonTlsContext().GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames = nil
			setAny(c.GetTransportSocket().GetTypedConfig(), up)
		},
		"inbound chain without TLS": func(r *proxyconfig.Resources) {
			find(r.Listeners, proxyconfig.VirtualInbound).FilterChains[0].TransportSocket = nil
		},
		"client certificate optional": func(r *proxyconfig.Resources) {
			fc := find(r.Listeners, proxyconfig.VirtualInbound).FilterChains[0]
			d := &tlsv3.DownstreamTlsContext{}
			_ = fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(d)
			d.RequireClientCertificate = wrapperspb.Bool(false)
			setAny(fc.GetTransportSocket().GetTypedConfig(), d)
		},
		"default filter chain": func(r *proxyconfig.Resources) {
			l := find(r.Listeners, proxyconfig.VirtualInbound)
			l.DefaultFilterChain = &listenerv3.FilterChain{}
		},
		"passthrough from the outbound capture listener": func(r *proxyconfig.Resources) {
			l := find(r.Listeners, proxyconfig.VirtualOutbound)
			l.FilterChains[0].Filters = find(r.Listeners, proxyconfig.VirtualInbound).FilterChains[1].Filters
		},
		"plaintext cluster to another host": func(r *proxyconfig.Resources) {
			c := find(r.Clusters, proxyconfig.InboundCluster(80))
			c.LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().Address = "10.0.0.2"
		},
	}
	if err := proxyconfig.CheckStrict(sidecar(t)); err != nil {
		t.Fatalf("unmodified resources: %v", err)
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			r := sidecar(t)
			mutate(r)
			if err := proxyconfig.CheckStrict(r); !errors.Is(err, proxyconfig.ErrPlaintext) {
				t.Fatalf("CheckStrict() = %v, want ErrPlaintext", err)
			}
		})
	}
}

// TestValidateLooksInsideAny: an invalid filter config packed in an Any is
// caught, which the top-level ValidateAll alone would miss.
func TestValidateLooksInsideAny(t *testing.T) {
	r := sidecar(t)
	l := find(r.Listeners, proxyconfig.VirtualInbound)
	if err := proxyconfig.Validate(l); err != nil {
		t.Fatal(err)
	}
	f := l.FilterChains[0].Filters[0]
	h := &hcmv3.HttpConnectionManager{}
	if err := f.GetTypedConfig().UnmarshalTo(h); err != nil {
		t.Fatal(err)
	}
	h.StatPrefix = "" // required by the proto's rules
	setAny(f.GetTypedConfig(), h)
	if err := l.ValidateAll(); err != nil {
		t.Fatalf("top-level ValidateAll() = %v; the test assumes it does not look inside Any", err)
	}
	if err := proxyconfig.Validate(l); !errors.Is(err, proxyconfig.ErrInvalidResource) {
		t.Fatalf("Validate() = %v, want ErrInvalidResource", err)
	}
}

func setAny(a *anypb.Any, m proto.Message) {
	if err := a.MarshalFrom(m); err != nil {
		panic(err)
	}
}
