package proxyconfig_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

func tracingConfig(t *testing.T, collector string, pct float64) proxyconfig.Config {
	t.Helper()
	cfg := testConfig(t)
	cfg.Tracing = proxyconfig.Tracing{Collector: collector, SamplingPercent: pct}
	cfg, err := cfg.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// connectionManagers returns every HTTP connection manager of an Envoy's
// listeners.
func connectionManagers(t *testing.T, res *proxyconfig.Resources) []*hcmv3.HttpConnectionManager {
	t.Helper()
	var out []*hcmv3.HttpConnectionManager
	for _, l := range res.Listeners {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				h := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().UnmarshalTo(h) == nil {
					out = append(out, h)
				}
			}
		}
	}
	return out
}

// otelTracer returns the connection manager's OpenTelemetry tracer, or nil
// when it has no tracer.
func otelTracer(t *testing.T, h *hcmv3.HttpConnectionManager) *tracev3.OpenTelemetryConfig {
	t.Helper()
	tr := h.GetTracing()
	if tr == nil {
		return nil
	}
	if tr.GetProvider().GetName() != proxyconfig.OpenTelemetryTracer {
		t.Fatalf("%s: tracer %q, want %s", h.GetStatPrefix(), tr.GetProvider().GetName(), proxyconfig.OpenTelemetryTracer)
	}
	oc := &tracev3.OpenTelemetryConfig{}
	if err := tr.GetProvider().GetTypedConfig().UnmarshalTo(oc); err != nil {
		t.Fatalf("%s: tracer config: %v", h.GetStatPrefix(), err)
	}
	return oc
}

// buildAll builds every node of the mesh, checks that the resources
// validate, are strict mTLS and keep the invariants of TestRandomMeshes,
// and returns them by node.
func buildAll(t *testing.T, where string, cfg proxyconfig.Config, m *mesh.Mesh) map[string]*proxyconfig.Resources {
	t.Helper()
	b := proxyconfig.NewBuilder(cfg, m, nil)
	out := map[string]*proxyconfig.Resources{}
	for name, n := range nodesOf(m) {
		res, err := b.Build(n)
		if err != nil {
			t.Fatalf("%s: %s: Build() = %v", where, name, err)
		}
		if err := res.ValidateAll(); err != nil {
			t.Fatalf("%s: %s: %v", where, name, err)
		}
		if err := proxyconfig.CheckStrict(res); err != nil {
			t.Fatalf("%s: %s: CheckStrict() = %v", where, name, err)
		}
		checkInvariants(t, where+": "+name, m, n, res)
		checkConnectionManagers(t, where+": "+name, cfg, n, res)
		if !n.Proxyless {
			out[name] = res
		}
	}
	return out
}

// TestNoTracerUnlessConfigured: without a collector, no connection manager
// has a tracer and there is no collector cluster.
func TestNoTracerUnlessConfigured(t *testing.T) {
	for seed := range uint64(30) {
		m := meshtest.Random(rand.New(rand.NewPCG(seed, 7)), td)
		for name, res := range buildAll(t, fmt.Sprintf("seed %d", seed), testConfig(t), m) {
			for _, h := range connectionManagers(t, res) {
				if h.GetTracing() != nil {
					t.Fatalf("seed %d: %s: %s has a tracer with no collector configured", seed, name, h.GetStatPrefix())
				}
			}
			if slices.ContainsFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == proxyconfig.TracingCluster }) {
				t.Fatalf("seed %d: %s: a collector cluster with no collector configured", seed, name)
			}
		}
	}
}

// TestTracerToMeshCollector: a collector that is a mesh service is reached
// through its outbound cluster (mesh mTLS), under any of the names a
// sidecar knows it by; every Envoy connection manager has the tracer, with
// the sampling percent, and the cluster it names is among the node's.
func TestTracerToMeshCollector(t *testing.T) {
	tried := 0
	for seed := range uint64(60) {
		m := meshtest.Random(rand.New(rand.NewPCG(seed, 7)), td)
		var svc *mesh.Service
		for _, s := range m.Services {
			if len(s.Endpoints) > 0 && len(s.Ports) > 0 {
				svc = s
				break
			}
		}
		if svc == nil {
			continue
		}
		port := svc.Ports[len(svc.Ports)-1].Port
		names := []string{svc.Hostname, svc.Name + "." + svc.Namespace, svc.Name + "." + svc.Namespace + ".svc"}
		cfg := tracingConfig(t, fmt.Sprintf("%s:%d", names[int(seed)%3], port), 2.5)
		want := proxyconfig.OutboundCluster(port, svc.Hostname)
		managers := 0
		for name, res := range buildAll(t, fmt.Sprintf("seed %d", seed), cfg, m) {
			for _, h := range connectionManagers(t, res) {
				managers++
				oc := otelTracer(t, h)
				if oc == nil {
					t.Fatalf("seed %d: %s: %s has no tracer", seed, name, h.GetStatPrefix())
				}
				if got := oc.GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != want {
					t.Fatalf("seed %d: %s: tracer exports to %q, want %q", seed, name, got, want)
				}
				if got := h.GetTracing().GetRandomSampling().GetValue(); got != 2.5 {
					t.Fatalf("seed %d: %s: random sampling %v, want 2.5", seed, name, got)
				}
				if !slices.ContainsFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == want }) {
					t.Fatalf("seed %d: %s: the tracer's cluster %s is not the node's", seed, name, want)
				}
			}
			if slices.ContainsFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == proxyconfig.TracingCluster }) {
				t.Fatalf("seed %d: %s: a dedicated cluster for a mesh collector", seed, name)
			}
		}
		if managers > 0 {
			tried++
		}
	}
	if tried < 10 {
		t.Fatalf("only %d meshes had a collector service and a connection manager", tried)
	}
}

// TestTracerToOutsideCollector: a collector outside the mesh gets its own
// HTTP/2 cluster, in the clear only on loopback, otherwise TLS verifying the
// collector's name against the system roots; CheckStrict passes either way.
func TestTracerToOutsideCollector(t *testing.T) {
	m := meshtest.Random(rand.New(rand.NewPCG(3, 7)), td)
	for _, tc := range []struct {
		collector, host string
		tls             bool
		san             tlsv3.SubjectAltNameMatcher_SanType
	}{
		{"otel.observability.example:4317", "otel.observability.example", true, tlsv3.SubjectAltNameMatcher_DNS},
		{"192.0.2.7:4317", "192.0.2.7", true, tlsv3.SubjectAltNameMatcher_IP_ADDRESS},
		{"127.0.0.1:4317", "127.0.0.1", false, 0},
	} {
		cfg := tracingConfig(t, tc.collector, 100)
		nodes := buildAll(t, tc.collector, cfg, m)
		if len(nodes) == 0 {
			t.Fatal("no Envoy node")
		}
		for name, res := range nodes {
			i := slices.IndexFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == proxyconfig.TracingCluster })
			if i < 0 {
				t.Fatalf("%s: %s: no collector cluster", tc.collector, name)
			}
			c := res.Clusters[i]
			if len(c.GetTypedExtensionProtocolOptions()) == 0 {
				t.Fatalf("%s: %s: the collector cluster does not speak HTTP/2", tc.collector, name)
			}
			if got := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress(); got.GetAddress() != tc.host || got.GetPortValue() != 4317 {
				t.Fatalf("%s: %s: collector cluster reaches %v", tc.collector, name, got)
			}
			if !tc.tls {
				if c.GetTransportSocket() != nil {
					t.Fatalf("%s: %s: TLS to a loopback collector", tc.collector, name)
				}
			} else {
				up := &tlsv3.UpstreamTlsContext{}
				if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up); err != nil {
					t.Fatalf("%s: %s: collector cluster has no TLS: %v", tc.collector, name, err)
				}
				vc := up.GetCommonTlsContext().GetValidationContext()
				sans := vc.GetMatchTypedSubjectAltNames()
				if vc.GetTrustedCa().GetFilename() != proxyconfig.DefaultSystemRoots || len(sans) != 1 ||
					sans[0].GetSanType() != tc.san || sans[0].GetMatcher().GetExact() != tc.host {
					t.Fatalf("%s: %s: collector TLS does not verify %s against the system roots: %v", tc.collector, name, tc.host, vc)
				}
			}
			for _, h := range connectionManagers(t, res) {
				oc := otelTracer(t, h)
				if oc == nil || oc.GetGrpcService().GetEnvoyGrpc().GetClusterName() != proxyconfig.TracingCluster ||
					oc.GetGrpcService().GetEnvoyGrpc().GetAuthority() != tc.host {
					t.Fatalf("%s: %s: %s tracer = %v", tc.collector, name, h.GetStatPrefix(), oc)
				}
			}
		}
	}
}

// TestTracerCollectorServiceUnusable: a collector that names a mesh service
// with no endpoints, or a port the service does not have, gives no tracer
// (a tracer naming a missing cluster would make Envoy refuse the listener)
// and a warning that says why; never a plaintext cluster to a mesh host.
func TestTracerCollectorServiceUnusable(t *testing.T) {
	m := meshtest.Random(rand.New(rand.NewPCG(5, 7)), td)
	var svc *mesh.Service
	for _, s := range m.Services {
		if len(s.Endpoints) > 0 && len(s.Ports) > 0 {
			svc = s
			break
		}
	}
	if svc == nil {
		t.Fatal("no service with endpoints")
	}
	empty := &mesh.Service{Namespace: svc.Namespace, Name: "collector", Hostname: "collector." + svc.Namespace + ".svc.cluster.local",
		Ports: []mesh.Port{{Name: "grpc", Port: 4317, Protocol: mesh.GRPC}}}
	m.Services = append(m.Services, empty)
	for collector, want := range map[string]string{
		"collector." + svc.Namespace + ":4317": "has no endpoints",
		fmt.Sprintf("%s:%d", svc.Hostname, 1):  "has no port 1",
	} {
		for name, res := range buildAll(t, collector, tracingConfig(t, collector, 1), m) {
			for _, h := range connectionManagers(t, res) {
				if h.GetTracing() != nil {
					t.Fatalf("%s: %s: %s has a tracer", collector, name, h.GetStatPrefix())
				}
			}
			if slices.ContainsFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == proxyconfig.TracingCluster }) {
				t.Fatalf("%s: %s: a dedicated cluster to a mesh host", collector, name)
			}
			if !slices.ContainsFunc(res.Warnings, func(w string) bool { return strings.Contains(w, want) }) {
				t.Fatalf("%s: %s: warnings %q do not say %q", collector, name, res.Warnings, want)
			}
		}
	}
}

// TestTracingConfigRefused: a collector that is not host:port, or a
// sampling percent outside 0..100, is a configuration error.
func TestTracingConfigRefused(t *testing.T) {
	for _, tr := range []proxyconfig.Tracing{
		{Collector: "collector", SamplingPercent: 1},
		{Collector: "collector:0", SamplingPercent: 1},
		{Collector: ":4317", SamplingPercent: 1},
		{Collector: "collector:70000", SamplingPercent: 1},
		{Collector: "collector:4317", SamplingPercent: 101},
		{Collector: "collector:4317", SamplingPercent: -1},
	} {
		cfg := testConfig(t)
		cfg.Tracing = tr
		if _, err := cfg.WithDefaults(); !errors.Is(err, proxyconfig.ErrConfig) {
			t.Errorf("WithDefaults(%+v) = %v, want ErrConfig", tr, err)
		}
	}
	cfg := testConfig(t)
	cfg.Tracing = proxyconfig.Tracing{Collector: "collector.observability:4317", SamplingPercent: 0}
	if _, err := cfg.WithDefaults(); err != nil {
		t.Errorf("WithDefaults(0%% sampling) = %v", err)
	}
}
