package controlplane

import (
	"fmt"
	"net"
	"strconv"

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
			AuthzHost: host, AuthzPort: uint32(port), AuthzID: v.cpID, GatewayTrustedHops: v.XDS.GatewayTrustedHops},
		MaxStreamsPerIdentity: v.XDS.MaxStreamsPerIdentity, MaxNodesPerIdentity: v.XDS.MaxNodesPerIdentity,
		FirstPushHold: v.XDS.FirstPushHold,
		Clock:         v.Clock, Log: v.Log, Registerer: cp.registry,
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
