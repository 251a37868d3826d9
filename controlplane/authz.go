package controlplane

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/authz/authzd"
)

// newAuthz assembles the ext_authz service when there is policy to enforce:
// a policy directory, or AuthorizationPolicies on Kubernetes. It serves mTLS
// with the control plane's own certificate and accepts only clients with a
// certificate that verifies against the trust bundle in force.
func (cp *ControlPlane) newAuthz(v *validated) (*authzd.Service, error) {
	if v.Listen.Authz == "off" || v.Authz.PolicyDir == "" && !v.inKube {
		v.Log.Info("authorization service off: no --policies directory and not on Kubernetes")
		return nil, nil
	}
	tlsCfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: cp.serving.GetCertificate,
		ClientAuth:     tls.RequireAnyClientCert,
		NextProtos:     []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, _, err := x509svid.ParseAndVerify(raw, cp.authority, x509svid.WithTime(v.Clock.Now()))
			return err
		},
	}
	cfg := authzd.Config{
		Address: v.Listen.Authz, Creds: credentials.NewTLS(tlsCfg),
		RootNamespace: v.Authz.RootNamespace, DecisionLog: v.Authz.DecisionLog, Log: v.Log, OnKubernetes: v.inKube,
		Registerer: cp.registry, RedactPaths: v.Authz.LogRedactPaths, Connections: v.Listen.Connections,
		Bundles: v.bundles, TracerProvider: v.TracerProvider,
	}
	var err error
	if cfg.Mesh, err = cp.meshSource(v); err != nil {
		return nil, err
	}
	if cfg.Feed, err = cp.policies(v); err != nil {
		return nil, err
	}
	svc, err := authzd.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	return svc, nil
}
