package controlplane

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/ca/server"
)

// openJournal opens the journal, in the data directory or the shared
// database, with its checkpoint key and witness.
func (cp *ControlPlane) openJournal(ctx context.Context, v *validated) (err error) {
	dir := admin.DataDir(v.DataDir)
	jo := admin.JournalOptions{DSN: v.Journal.DSN, CheckpointKeyURI: v.Journal.CheckpointKeyURI, Log: v.Log}
	if v.CA.Secret != "" && v.Journal.CheckpointKeyURI == "" {
		// Replicas share the journal, so they share its checkpoint key.
		jo.Kube = cp.cluster.kube
		jo.CheckpointSecret = v.CA.Secret + "-checkpoint"
	}
	if v.Journal.Witness != "" {
		if cp.witness, err = journal.NewExport(journal.ExportConfig{
			Target: v.Journal.Witness, Key: v.Journal.WitnessKey, Cosigned: filepath.Join(string(dir), journal.WitnessCosignedFile), Log: v.Log,
		}); err != nil {
			return err
		}
		cp.registry.MustRegister(cp.witness)
		jo.Witness = cp.witness
	}
	if cp.journal, _, err = dir.OpenJournal(ctx, v.td.Name(), jo, false); err != nil {
		return err
	}
	cp.registry.MustRegister(cp.journal)
	if cp.witness != nil {
		return cp.witness.Attach(ctx, cp.journal)
	}
	return nil
}

// newAuthority sets up CA rotation (leader-elected when the material lives
// in a Secret), loads the CA material in force, and builds the CA.
func (cp *ControlPlane) newAuthority(ctx context.Context, v *validated) (err error) {
	dir := admin.DataDir(v.DataDir)
	var store rotation.Store
	var isLeader func() bool
	if v.CA.Secret != "" {
		ns, name, _ := strings.Cut(v.CA.Secret, "/")
		store = rotation.SecretStore{Client: cp.cluster.kube, Namespace: ns, Name: name}
		if cp.elector, err = newElector(cp.cluster.kube, ns, name+"-rotation", v.Log); err != nil {
			return err
		}
		isLeader = cp.elector.IsLeader
	}
	// Whether a CA is here already, before the serving manager creates one
	// (or adopts --cacerts), for the start-up message.
	fresh := false
	if op, err := rotation.Open(rotation.Config{Store: store, Dir: dir.CADir(), TrustDomain: v.td}); err == nil {
		_, err = op.ReadState(ctx)
		fresh = errors.Is(err, rotation.ErrNoCA)
	}
	if fresh && v.CA.CertsDir == "" {
		// A journal with history and no CA beside it means the CA was lost,
		// not that this is a first start: minting a new root here would
		// silently replace the CA whose certificates the journal vouches for.
		latest, err := cp.journal.LatestIssuanceTime(ctx)
		if err != nil {
			return fmt.Errorf("controlplane: %w", err)
		}
		if !latest.IsZero() {
			where := dir.CADir()
			if v.CA.Secret != "" {
				where = "the Secret " + v.CA.Secret
			}
			return fmt.Errorf("controlplane: the journal holds issuances (the latest at %s) but %s holds no CA: restore the CA from a backup; trustmesh does not create a new CA over a journal's history",
				latest.UTC().Format(time.RFC3339), where)
		}
	}
	if cp.rotation, err = rotation.New(rotation.Config{
		Store: store, IsLeader: isLeader,
		Dir: dir.CADir(), TrustDomain: v.td, Recorder: cp.journal, Clock: v.Clock, Log: v.Log,
		MaxWorkloadTTL: v.CA.MaxWorkloadTTL, Interval: v.Rotation.Interval, Automatic: !v.Rotation.Manual,
		IntermediateLifetime: v.Rotation.IntermediateTTL, RootLifetime: v.Rotation.RootTTL,
		RootPropagation: v.Rotation.RootPropagation, Backdate: v.Rotation.Backdate,
		TracerProvider: v.TracerProvider,
	}); err != nil {
		return err
	}
	if v.CA.CertsDir != "" {
		// Operator-supplied material: adopted as the first generation, its
		// key referenced where the operator keeps it, never copied.
		if err := cp.rotation.Adopt(ctx, v.CA.CertsDir, v.CA.KeyURI); err != nil {
			return err
		}
	}
	material, err := cp.rotation.Initial(ctx)
	if err != nil {
		return err
	}
	logCA(v, material, fresh)
	cp.authority = authority.New(v.td, material)
	if err := cp.newNodeModel(v); err != nil {
		return err
	}
	cfg := ca.Config{
		TrustDomain: v.td, Authority: cp.authority, Recorder: cp.journal, Clock: v.Clock,
		DefaultTTL: v.CA.DefaultWorkloadTTL, MinTTL: v.CA.MinWorkloadTTL, MaxTTL: v.CA.MaxWorkloadTTL,
		Backdate: v.CA.WorkloadBackdate, MaxClockSkew: v.CA.MaxClockSkew,
		Reserved: []spiffeid.ID{v.cpID},
	}
	if cp.nodes != nil {
		cfg.Nodes = cp.nodes
	}
	if cp.ca, err = ca.New(cfg); err != nil {
		return err
	}
	return nil
}

// newNodeModel builds the mesh model's answer to what each node agent may
// hold, when there is a mesh (the --mesh files, or the cluster); without
// one, delegated issuance is off.
func (cp *ControlPlane) newNodeModel(v *validated) error {
	src, err := cp.meshSource(v)
	if err != nil || src == nil {
		return err
	}
	// No Clock: the bounded wait is for the informers and the file watch,
	// which run on real time, not for a certificate's validity.
	cp.nodes = &NodeModel{
		Mesh: cp.meshFeed, TrustDomain: v.td, Kubernetes: v.XDS.MeshDir == "" && v.inKube, Log: v.Log,
	}
	return nil
}

// newAuthenticator authenticates CSRs: join tokens, renewal with a
// certificate in force, and Kubernetes service-account tokens on Kubernetes.
func (cp *ControlPlane) newAuthenticator(v *validated) (*authn.Authenticator, error) {
	renewal := &authn.Renewal{
		TrustDomain: v.td, Bundle: cp.authority, Store: cp.journal,
		MaxEnrolmentAge: v.CA.MaxEnrolmentAge, Clock: v.Clock,
	}
	authenticator := &authn.Authenticator{
		TrustDomain: v.td,
		JoinTokens:  &authn.JoinTokens{TrustDomain: v.td, Store: cp.journal, Clock: v.Clock},
		Renewal:     renewal,
	}
	if v.inKube {
		var err error
		if authenticator.Kubernetes, err = authn.NewKubernetes(authn.KubernetesConfig{
			TrustDomain: v.td, Client: cp.cluster.kube, Audience: v.CA.TokenAudience, Clock: v.Clock,
			StaleCacheLimit: v.CA.KubeStaleCacheLimit,
		}); err != nil {
			return nil, err
		}
		authenticator.Renewal.Kubernetes = authenticator.Kubernetes
		cp.kubeAuth = authenticator.Kubernetes
	}
	return authenticator, nil
}

// newCAServer builds the CA port's gRPC server with the control plane's
// serving certificate and registers the certificate service on it.
func (cp *ControlPlane) newCAServer(ctx context.Context, v *validated, authenticator *authn.Authenticator) (err error) {
	cp.refusals = journal.NewRefusalLog(journal.RefusalLogConfig{Appender: cp.journal, Clock: v.Clock, Log: v.Log})
	cp.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := server.NewMetrics(cp.registry, cp.authority.Current)

	if cp.serving, err = server.NewServingCert(ctx, server.ServingCertConfig{
		Issuer: cp.ca, ID: v.cpID, DNSNames: v.dns, IPs: v.ips, Clock: v.Clock, Log: v.Log,
		Issuing: func() *x509.Certificate { return cp.authority.Current().Cert },
	}); err != nil {
		return err
	}
	// connlimit sets what requests on this port may hold: their size, the
	// streams per connection, and how many and how long may be arriving.
	cp.grpc = grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(cp.serving.TLSConfig()))},
		v.Listen.Connections.GRPCTLSOptions()...)...)
	pb.RegisterIstioCertificateServiceServer(cp.grpc, server.NewCertificateService(server.CertificateServiceConfig{
		Issuer: cp.ca, Authenticator: authenticator, Refusals: cp.refusals, Metrics: metrics, Clock: v.Clock, Log: v.Log,
		TracerProvider: v.TracerProvider,
	}))
	// The node service: node agents' delegated issuance. A node proves
	// itself with its node SVID (checked as a renewal is) or, on
	// Kubernetes, with the pod-bound token of a trusted node account; the
	// CA authorizes every identity against the mesh (cp.nodes), and refuses
	// all of them without one.
	nodeAuth := &authn.NodeAuthenticator{
		TrustDomain: v.td, Renewal: authenticator.Renewal, Kubernetes: authenticator.Kubernetes,
		TrustedAccounts: v.CA.TrustedNodeAccounts,
	}
	if cp.nodes != nil {
		nodeAuth.Pods = cp.nodes
	}
	cav1.RegisterNodeServiceServer(cp.grpc, server.NewNodeService(server.NodeServiceConfig{
		CA: cp.ca, Authenticator: nodeAuth, Refusals: cp.refusals, Metrics: metrics, Clock: v.Clock, Log: v.Log,
	}))
	return nil
}

// logCA says, once per start, which CA this control plane serves: one it
// created (or adopted from --cacerts) on this first start, or the one it
// found; where it lives, its root's SHA-256 fingerprint (as `openssl x509
// -fingerprint -sha256` prints it) and validity, and where the journal is.
func logCA(v *validated, m *authority.Material, fresh bool) {
	msg := "reusing the CA"
	switch {
	case fresh && v.CA.CertsDir != "":
		msg = "adopted the operator-supplied CA from --cacerts"
	case fresh:
		msg = "created a new CA"
	}
	where := admin.DataDir(v.DataDir).CADir()
	if v.CA.Secret != "" {
		where = "secret " + v.CA.Secret
	}
	journalAt := admin.DataDir(v.DataDir).JournalPath()
	if v.Journal.DSN != "" {
		journalAt = "PostgreSQL (--journal-dsn)"
	}
	root := m.Anchor
	if root == nil && len(m.Roots) > 0 {
		root = m.Roots[0]
	}
	attrs := []any{"trust_domain", v.td.Name(), "data_dir", v.DataDir, "ca", where, "journal", journalAt}
	if root != nil {
		attrs = append(attrs, "root_sha256", fingerprint(root),
			"root_not_before", root.NotBefore.UTC().Format(time.RFC3339), "root_not_after", root.NotAfter.UTC().Format(time.RFC3339))
	}
	v.Log.Info(msg, attrs...)
}

// fingerprint is a certificate's SHA-256 fingerprint, in colon-separated
// upper-case hex.
func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	var b strings.Builder
	for i, x := range sum {
		if i > 0 {
			b.WriteByte(':')
		}
		fmt.Fprintf(&b, "%02X", x)
	}
	return b.String()
}
