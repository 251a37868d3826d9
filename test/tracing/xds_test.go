package tracing

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"
)

const listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"

// mesh is one HTTP service, shop/web, whose pod web-0 runs as webID.
var mesh = map[string]string{"mesh.yaml": `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.1.1, pod: web-0, spiffeID: "spiffe://cluster.local/ns/shop/sa/web", labels: {app: web}}
`}

// webNode is web-0's Envoy as istio-agent names it.
var webNode = func() *corev3.Node {
	md, err := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "web", "NAMESPACE": "shop", "LABELS": map[string]any{"app": "web"}})
	if err != nil {
		panic(err)
	}
	return &corev3.Node{Id: "sidecar~10.0.1.1~web-0.shop~shop.svc.cluster.local", Metadata: md}
}()

// fetchListeners asks the xDS server on the CA port for n's listeners, as
// w, and returns the first response's.
func fetchListeners(t *testing.T, s *serve, roots *x509.CertPool, w *workload, n *corev3.Node) []*listenerv3.Listener {
	t.Helper()
	conn, err := grpc.NewClient(s.ca, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: s.caServingName, MinVersion: tls.VersionTLS12,
		Certificates: []tls.Certificate{{Certificate: w.chain, PrivateKey: w.key}},
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: listenerType}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatalf("ADS as %s: %v\n%s", n.GetId(), err, s.lastLog())
	}
	var out []*listenerv3.Listener
	for _, a := range resp.GetResources() {
		l := &listenerv3.Listener{}
		if err := a.UnmarshalTo(l); err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

// checkProxyTracer asserts that every HTTP connection manager served to
// the proxy has Envoy's OpenTelemetry tracer, exporting to collector (on
// loopback: the dedicated cluster) at the sampling percent serve was
// given, and that the inbound ones name the workload's service.
func checkProxyTracer(t *testing.T, listeners []*listenerv3.Listener, collector string, pct float64) {
	t.Helper()
	host, _, err := net.SplitHostPort(collector)
	if err != nil {
		t.Fatal(err)
	}
	managers := 0
	for _, l := range listeners {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				h := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().UnmarshalTo(h) != nil {
					continue
				}
				managers++
				at := fmt.Sprintf("listener %s chain %s", l.GetName(), fc.GetName())
				tr := h.GetTracing()
				if tr.GetProvider().GetName() != "envoy.tracers.opentelemetry" {
					t.Fatalf("%s: tracer %v, want envoy.tracers.opentelemetry", at, tr)
				}
				oc := &tracev3.OpenTelemetryConfig{}
				if err := tr.GetProvider().GetTypedConfig().UnmarshalTo(oc); err != nil {
					t.Fatalf("%s: %v", at, err)
				}
				g := oc.GetGrpcService().GetEnvoyGrpc()
				if g.GetClusterName() != "trustmesh-otel-collector" || g.GetAuthority() != host {
					t.Fatalf("%s: tracer exports to cluster %q authority %q, want trustmesh-otel-collector for %s", at, g.GetClusterName(), g.GetAuthority(), collector)
				}
				if got := tr.GetRandomSampling().GetValue(); got != pct {
					t.Fatalf("%s: random sampling %v%%, want %v%%", at, got, pct)
				}
				if l.GetTrafficDirection() == corev3.TrafficDirection_INBOUND && oc.GetServiceName() != "web.shop" {
					t.Fatalf("%s: the inbound tracer's service name is %q, want web.shop", at, oc.GetServiceName())
				}
			}
		}
	}
	if managers == 0 {
		t.Fatalf("no HTTP connection manager among %d listeners", len(listeners))
	}
}

// checkPush asserts the xds.push span of the node's first configuration.
func checkPush(t *testing.T, c *otelcol, n *corev3.Node) {
	t.Helper()
	forNode := func(all []span) []span {
		var out []span
		for _, s := range named(all, "xds.push") {
			if s.Attrs["xds.node_id"] == n.GetId() {
				out = append(out, s)
			}
		}
		return out
	}
	pushes := forNode(waitSpans(t, c, "the node's xds.push span", func(all []span) bool { return len(forNode(all)) > 0 }))
	p := pushes[0]
	if p.Scope != "trustmesh/xds" || p.Kind != kindInternal || p.ParentSpanID != "" {
		t.Fatalf("xds.push: tracer %q, kind %d, parent %q; want a root internal span of trustmesh/xds", p.Scope, p.Kind, p.ParentSpanID)
	}
	if v, ok := p.Attrs["xds.version"].(int64); !ok || v < 1 {
		t.Fatalf("xds.push: xds.version = %v (%T), want a positive integer", p.Attrs["xds.version"], p.Attrs["xds.version"])
	}
	types, _ := p.Attrs["xds.types"].([]any)
	if !slices.Contains(types, any(listenerType)) {
		t.Fatalf("xds.push: xds.types = %v, want the listener type among them", p.Attrs["xds.types"])
	}
}
