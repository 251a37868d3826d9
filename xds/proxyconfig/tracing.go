package proxyconfig

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/trustmesh/trustmesh/mesh"
)

// TracingCluster is the cluster of a collector outside the mesh.
const TracingCluster = "trustmesh-otel-collector"

// OpenTelemetryTracer is the name of Envoy's OpenTelemetry tracer.
const OpenTelemetryTracer = "envoy.tracers.opentelemetry"

// DefaultTracingSampling is the percent of requests an Envoy starts a trace
// for when none is configured, as Istio's default.
const DefaultTracingSampling = 1.0

// Tracing gives every Envoy HTTP connection manager an OpenTelemetry tracer
// that exports spans to a collector over OTLP/gRPC, as Istio's
// MeshConfig extensionProviders.opentelemetry with a Telemetry resource
// does. With a tracer, Envoy's ext_authz client puts its span's W3C context
// in the Check call's metadata, so that the authorization service's span
// joins the request's trace. The zero value configures no tracer.
type Tracing struct {
	// Collector is the collector's OTLP/gRPC "host:port". A mesh service's
	// host name (NAME.NAMESPACE.svc.DOMAIN, NAME.NAMESPACE or
	// NAME.NAMESPACE.svc) and port is reached through its outbound cluster,
	// over mesh mTLS. Any other host gets its own cluster: plaintext only to
	// a loopback address, otherwise TLS verified against the system roots
	// for that name, since nothing leaves the pod in the clear.
	Collector string
	// SamplingPercent of requests (0 to 100) start a trace at the Envoy
	// that first sees them; a request that arrives with a trace context
	// keeps its sampling decision.
	SamplingPercent float64
}

// Enabled reports whether a tracer is configured.
func (t Tracing) Enabled() bool { return t.Collector != "" }

// check validates the tracing configuration.
func (t Tracing) check() error {
	if !t.Enabled() {
		return nil
	}
	return errors.Join(CheckCollector(t.Collector), CheckSamplingPercent(t.SamplingPercent))
}

// CheckCollector checks a collector address: host:port, port 1 to 65535.
func CheckCollector(addr string) error {
	_, _, err := Tracing{Collector: addr}.hostPort()
	return err
}

// CheckSamplingPercent checks a sampling percent: 0 to 100.
func CheckSamplingPercent(pct float64) error {
	if !(pct >= 0 && pct <= 100) { // also refuses NaN
		return fmt.Errorf("%w: the tracing sampling percent %v is not between 0 and 100", ErrConfig, pct)
	}
	return nil
}

func (t Tracing) hostPort() (string, uint32, error) {
	host, portStr, err := net.SplitHostPort(t.Collector)
	if err != nil {
		return "", 0, fmt.Errorf("%w: tracing collector %q is not host:port: %w", ErrConfig, t.Collector, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 || host == "" {
		return "", 0, fmt.Errorf("%w: tracing collector %q needs a host and a port from 1 to 65535", ErrConfig, t.Collector)
	}
	return host, uint32(port), nil
}

// tracer is what the builder worked out once for the mesh: the cluster the
// tracer exports through, the dedicated cluster to add (if any), and why
// there is no tracer (when there is none although one is configured).
type tracer struct {
	host    string
	cluster string
	own     *clusterv3.Cluster
	warning string
}

// tracerFor finds how Envoys reach the collector in this mesh.
func (b *Builder) tracerFor() *tracer {
	b.tracerOnce.Do(func() {
		if !b.cfg.Tracing.Enabled() {
			return
		}
		host, port, err := b.cfg.Tracing.hostPort()
		if err != nil { // WithDefaults has checked it
			b.tracer = &tracer{warning: err.Error()}
			return
		}
		if s := b.meshServiceNamed(host); s != nil {
			var p *mesh.Port
			for i := range s.Ports {
				if s.Ports[i].Port == port {
					p = &s.Ports[i]
				}
			}
			switch {
			case p == nil:
				b.tracer = &tracer{warning: fmt.Sprintf("tracing collector %s: service %s has no port %d; no tracer", b.cfg.Tracing.Collector, s.Key(), port)}
			case len(s.Endpoints) == 0:
				b.tracer = &tracer{warning: fmt.Sprintf("tracing collector %s: service %s has no endpoints; no tracer", b.cfg.Tracing.Collector, s.Key())}
			default:
				b.tracer = &tracer{host: s.Hostname, cluster: OutboundCluster(port, s.Hostname)}
			}
			return
		}
		b.tracer = &tracer{host: host, cluster: TracingCluster, own: b.collectorCluster(host, port)}
	})
	return b.tracer
}

// meshServiceNamed is the mesh service a host names, by any of the names a
// sidecar routes it by, or nil.
func (b *Builder) meshServiceNamed(host string) *mesh.Service {
	for _, s := range b.mesh.Services {
		short := s.Name + "." + s.Namespace
		if host == s.Hostname || host == short || host == short+".svc" {
			return s
		}
	}
	return nil
}

// collectorCluster reaches a collector outside the mesh: in the clear only
// on loopback (a collector in the pod or the node's network namespace),
// otherwise over TLS that verifies the collector's name against the system
// roots. It speaks HTTP/2 (gRPC).
func (b *Builder) collectorCluster(host string, port uint32) *clusterv3.Cluster {
	c := staticCluster(TracingCluster, host, port)
	c.TypedExtensionProtocolOptions = http2Options()
	if a, err := netip.ParseAddr(host); err == nil && a.IsLoopback() {
		return c
	}
	san := &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_DNS,
		Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: host}}}
	sni := host
	if _, err := netip.ParseAddr(host); err == nil {
		san.SanType = tlsv3.SubjectAltNameMatcher_IP_ADDRESS
		sni = ""
	}
	c.TransportSocket = &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{
		Sni: sni,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams:     &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
			AlpnProtocols: []string{"h2"},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa:                 &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: b.cfg.SystemRoots}},
				MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{san},
			}},
		},
	})}}
	return c
}

// addTracing adds the dedicated collector cluster, or the reason for no
// tracer, to a node's resources.
func (b *Builder) addTracing(r *Resources) {
	t := b.tracerFor()
	switch {
	case t == nil:
	case t.warning != "":
		r.Warnings = append(r.Warnings, t.warning)
	case t.own != nil:
		r.Clusters = append(r.Clusters, t.own)
	}
}

// httpTracing is the connection manager's tracer, or nil. service names
// the proxy's workload in its spans ("" leaves Envoy's default).
func (b *Builder) httpTracing(service string) *hcmv3.HttpConnectionManager_Tracing {
	t := b.tracerFor()
	if t == nil || t.cluster == "" {
		return nil
	}
	return &hcmv3.HttpConnectionManager_Tracing{
		RandomSampling: &typev3.Percent{Value: b.cfg.Tracing.SamplingPercent},
		Provider: &tracev3.Tracing_Http{Name: OpenTelemetryTracer, ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: mustAny(&tracev3.OpenTelemetryConfig{
			GrpcService: &corev3.GrpcService{
				TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: t.cluster, Authority: t.host}},
				Timeout:         durationpb.New(5 * time.Second),
			},
			ServiceName: service,
		})}},
	}
}

// canonicalService names a workload in its spans as Istio does:
// CANONICAL-NAME.NAMESPACE, the canonical name from the workload's labels,
// else its pod's name.
func canonicalService(w *mesh.Workload) string {
	if w == nil {
		return ""
	}
	name := w.Name
	for _, k := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := w.Labels[k]; v != "" {
			name = v
			break
		}
	}
	return name + "." + w.Namespace
}
