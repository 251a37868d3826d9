package controlplane

import (
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// newXDS assembles the ADS server that joins the CA port, when there is a
// mesh to serve: a --mesh directory, or the cluster on Kubernetes. It takes
// its policies from the same place the authorization service does.
func (cp *ControlPlane) newXDS(v *validated) (*xds.Server, error) {
	if v.XDS.MeshDir == "" && !v.inKube {
		v.Log.Info("xDS server off: no --mesh directory and not on Kubernetes")
		return nil, nil
	}
	host, portStr, err := net.SplitHostPort(v.XDS.AuthzAddress)
	if err != nil {
		return nil, fmt.Errorf("controlplane: authz address %q: %w", v.XDS.AuthzAddress, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("controlplane: authz address %q: %w", v.XDS.AuthzAddress, err)
	}
	cfg := xds.Config{
		Bundle: cp.authority,
		Proxy: proxyconfig.Config{TrustDomain: v.td, RootNamespace: v.Authz.RootNamespace,
			AuthzHost: host, AuthzPort: uint32(port), AuthzID: v.cpID, GatewayTrustedHops: v.XDS.GatewayTrustedHops,
			Tracing: proxyconfig.Tracing{Collector: v.XDS.Tracing.Collector, SamplingPercent: v.XDS.Tracing.SamplingPercent}},
		MaxStreamsPerIdentity: v.XDS.MaxStreamsPerIdentity, MaxNodesPerIdentity: v.XDS.MaxNodesPerIdentity,
		FirstPushHold: v.XDS.FirstPushHold,
		// The mesh and policy feeds settle their own changes (250 ms), so
		// the server's debounce only has to coalesce two feeds publishing
		// together: a second 100 ms wait in series bought nothing.
		Debounce: 10 * time.Millisecond,
		Clock:    v.Clock, Log: v.Log, Registerer: cp.registry,
		TracerProvider: v.TracerProvider,
	}
	if cfg.Mesh, err = cp.meshSource(v); err != nil {
		return nil, err
	}
	feed, err := cp.policies(v)
	if err != nil {
		return nil, err
	}
	if feed != nil {
		cfg.Policies = feed
	}
	srv, err := xds.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	return srv, nil
}

// TracingConfig is where proxies send their spans: the HTTP connection
// managers of the Envoys this xDS server configures get an OpenTelemetry
// tracer, as Istio's MeshConfig extensionProviders.opentelemetry with a
// Telemetry resource gives them.
type TracingConfig struct {
	// Collector is the OTLP/gRPC collector "host:port" the proxies export
	// spans to (proxyconfig.Tracing says how they reach it); empty gives
	// them no tracer.
	Collector string
	// SamplingPercent of requests (0 to 100) a proxy starts a trace for.
	SamplingPercent float64
}

func (c *XDSConfig) check() []error {
	errs := []error{setting("tracing-sampling", proxyconfig.CheckSamplingPercent(c.Tracing.SamplingPercent))}
	if c.Tracing.Collector != "" {
		errs = append(errs, setting("tracing-collector", proxyconfig.CheckCollector(c.Tracing.Collector)))
	}
	return errs
}
