package controlplane

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// The layout of a data directory.
const (
	caSubdir          = "ca"
	journalFile       = "journal.db"
	checkpointKeyFile = "checkpoint-key.pem"
	checkpointPubFile = "checkpoint.pub"
	metaTrustDomain   = "trust_domain"
)

// DataDir is a trustmesh data directory.
type DataDir string

// CADir holds self-managed CA material.
func (d DataDir) CADir() string { return filepath.Join(string(d), caSubdir) }

// JournalPath is the embedded journal database.
func (d DataDir) JournalPath() string { return filepath.Join(string(d), journalFile) }

// CheckpointPubPath holds the verifier key of the journal's checkpoints, for
// `trustmesh audit` and outsiders.
func (d DataDir) CheckpointPubPath() string { return filepath.Join(string(d), checkpointPubFile) }

// JournalOptions say where the journal and its checkpoint key live.
type JournalOptions struct {
	// DSN is a PostgreSQL URL; empty selects SQLite in the data directory.
	DSN string
	// CheckpointKeyURI names the Ed25519 checkpoint key in a KMS; empty
	// selects (and on first use creates) a key file in the data directory.
	CheckpointKeyURI string
	// CheckpointSecret ("namespace/name") keeps the checkpoint key in a
	// Kubernetes Secret, created on first use, so that replicas sharing a
	// journal sign with one key. Used when CheckpointKeyURI is empty.
	CheckpointSecret string
	// CASecret ("namespace/name") is where serve --ca-secret keeps the CA
	// and its rotation state; commands that read the CA (the trust bundle,
	// the rotation audit) read it there instead of the data directory.
	CASecret string
	// Kube reaches CheckpointSecret and CASecret; when nil, Kubeconfig (or
	// the pod's service account) is used.
	Kube       kubernetes.Interface
	Kubeconfig string
	// Witness receives every new checkpoint.
	Witness journal.Witness
	Log     *slog.Logger
}

// OpenJournal opens the journal and binds it to a trust domain: the first
// start records the trust domain, and every later use must agree. An empty
// td accepts the recorded one. readOnly opens it without the checkpoint key,
// for audits.
func (d DataDir) OpenJournal(ctx context.Context, td string, o JournalOptions, readOnly bool) (*journal.Store, spiffeid.TrustDomain, error) {
	dsn := o.DSN
	if dsn == "" {
		dsn = d.JournalPath()
		if _, err := os.Stat(dsn); readOnly && errors.Is(err, fs.ErrNotExist) {
			return nil, spiffeid.TrustDomain{}, fmt.Errorf("controlplane: %s has no journal; start trustmesh serve on it first", d)
		}
	}
	cfg := journal.Config{DSN: dsn, Witness: o.Witness, Log: o.Log}
	store, err := journal.Open(ctx, cfg)
	if err != nil {
		return nil, spiffeid.TrustDomain{}, err
	}
	var stored string
	if td == "" {
		stored, err = store.Meta(ctx, metaTrustDomain)
		if errors.Is(err, journal.ErrNotFound) {
			err = fmt.Errorf("controlplane: %s has no trust domain yet; start trustmesh serve on it first", d)
		}
	} else {
		stored, err = store.SetMetaOnce(ctx, metaTrustDomain, td)
		if err == nil && stored != td {
			err = fmt.Errorf("controlplane: the journal belongs to trust domain %q, not %q", stored, td)
		}
	}
	var parsed spiffeid.TrustDomain
	if err == nil {
		if parsed, err = spiffeid.TrustDomainFromString(stored); err != nil {
			err = fmt.Errorf("controlplane: trust domain %q: %w", stored, err)
		}
	}
	if err == nil && !readOnly {
		err = d.attachSigner(ctx, store, parsed, o)
	}
	if err == nil && !readOnly {
		if err = store.Integrity(); err != nil {
			err = fmt.Errorf("controlplane: refusing to append to the journal: %w; run trustmesh audit verify", err)
		}
	}
	if err != nil {
		store.Close()
		return nil, spiffeid.TrustDomain{}, err
	}
	return store, parsed, nil
}

// JournalOrigin names a trust domain's journal in its checkpoints.
func JournalOrigin(td spiffeid.TrustDomain) string { return "trustmesh.journal/" + td.Name() }

// attachSigner loads (or on first use creates) the checkpoint key, which is
// separate from the CA key, and publishes its verifier key.
func (d DataDir) attachSigner(ctx context.Context, store *journal.Store, td spiffeid.TrustDomain, o JournalOptions) error {
	uri := o.CheckpointKeyURI
	var key crypto.Signer
	var err error
	switch {
	case uri != "":
		key, err = authority.OpenSigner(ctx, uri)
	case o.CheckpointSecret != "":
		key, err = checkpointKeyFromSecret(ctx, o)
	default:
		key, err = d.checkpointKeyFile(ctx)
	}
	if err != nil {
		return err
	}
	signer, vkey, err := journal.NewCheckpointSigner(JournalOrigin(td), key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(d.CheckpointPubPath(), []byte(vkey+"\n"), 0o644); err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	return store.SetSigner(ctx, signer, vkey)
}

// checkpointKeyFile loads, or on first use creates, the checkpoint key file
// in the data directory.
func (d DataDir) checkpointKeyFile(ctx context.Context) (crypto.Signer, error) {
	path := filepath.Join(string(d), checkpointKeyFile)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("controlplane: checkpoint key: %w", err)
		}
		if err := authority.WriteKeyFile(path, key); err != nil {
			return nil, err
		}
	}
	uri, err := authority.SoftKMSURI(path)
	if err != nil {
		return nil, err
	}
	return authority.OpenSigner(ctx, uri)
}

// kube is o.Kube, or a client from o.Kubeconfig (or the pod's service
// account).
func (o JournalOptions) kube() (kubernetes.Interface, error) {
	if o.Kube != nil {
		return o.Kube, nil
	}
	return kubeClient(nil, o.Kubeconfig)
}

// checkpointKeyFromSecret loads the checkpoint key from a Kubernetes Secret,
// creating it exactly once when replicas start together.
func checkpointKeyFromSecret(ctx context.Context, o JournalOptions) (crypto.Signer, error) {
	ns, name, ok := strings.Cut(o.CheckpointSecret, "/")
	if !ok {
		return nil, fmt.Errorf("controlplane: checkpoint secret %q is not namespace/name", o.CheckpointSecret)
	}
	client, err := o.kube()
	if err != nil {
		return nil, err
	}
	const dataKey = "checkpoint-key.pem"
	for attempt := 0; attempt < 3; attempt++ {
		sec, err := client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			return authority.SignerFromPEM(ctx, sec.Data[dataKey])
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("controlplane: checkpoint secret %s: %w", o.CheckpointSecret, err)
		}
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("controlplane: checkpoint key: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("controlplane: checkpoint key: %w", err)
		}
		_, err = client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
				Labels: map[string]string{"app.kubernetes.io/part-of": "trustmesh", "app.kubernetes.io/component": "journal"}},
			Type: corev1.SecretTypeOpaque,
			Data: map[string][]byte{dataKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})},
		}, metav1.CreateOptions{})
		if err == nil {
			return key, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("controlplane: create checkpoint secret %s: %w", o.CheckpointSecret, err)
		}
	}
	return nil, fmt.Errorf("controlplane: checkpoint secret %s kept changing", o.CheckpointSecret)
}

// CreateJoinToken makes a one-time join token for id in the data directory's
// CA, records its creation, and returns the token.
func CreateJoinToken(ctx context.Context, dir DataDir, o JournalOptions, id string, ttl time.Duration) (string, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, false)
	if err != nil {
		return "", err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return "", fmt.Errorf("controlplane: SPIFFE ID %q: %w", id, err)
	}
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	tok, _, err := jt.Create(ctx, sid, ttl)
	return tok, err
}

// Revoke revokes every enrolment of id and its unused join tokens, so the
// identity can no longer renew.
func Revoke(ctx context.Context, dir DataDir, o JournalOptions, id string) (journal.Revocation, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, false)
	if err != nil {
		return journal.Revocation{}, err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return journal.Revocation{}, fmt.Errorf("controlplane: SPIFFE ID %q: %w", id, err)
	}
	if sid.TrustDomain() != td {
		return journal.Revocation{}, fmt.Errorf("controlplane: %s is not in trust domain %s", sid, td)
	}
	return store.Revoke(ctx, sid.String(), time.Now())
}

// TrustBundle reads the trust bundle of the data directory's CA, or of
// operator-supplied material in cacertsDir.
func TrustBundle(ctx context.Context, dir DataDir, o JournalOptions, cacertsDir string) (*spiffebundle.Bundle, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, true)
	if err != nil {
		return nil, err
	}
	store.Close()
	if _, err := os.Stat(filepath.Join(dir.CADir(), "rotation.json")); o.CASecret == "" && cacertsDir != "" && err != nil {
		roots, err := pemutil.ReadCertificateBundle(filepath.Join(cacertsDir, authority.RootCertFile))
		if err != nil {
			return nil, fmt.Errorf("controlplane: read trust bundle: %w", err)
		}
		return spiffebundle.FromX509Authorities(td, roots), nil
	}
	mgr, err := dir.rotationManager(td, nil, o)
	if err != nil {
		return nil, err
	}
	mat, _, err := mgr.Certificates(ctx, time.Now())
	if err != nil {
		return nil, err
	}
	return spiffebundle.FromX509Authorities(td, mat.Roots), nil
}

// rotationManager reads and writes the CA where serve keeps it: the Secret
// named by o.CASecret, or else the data directory.
func (d DataDir) rotationManager(td spiffeid.TrustDomain, rec rotation.Recorder, o JournalOptions) (*rotation.Manager, error) {
	cfg := rotation.Config{Dir: d.CADir(), TrustDomain: td, Recorder: rec, FromCLI: true}
	if o.CASecret != "" {
		ns, name, ok := strings.Cut(o.CASecret, "/")
		if !ok || ns == "" || name == "" {
			return nil, fmt.Errorf("controlplane: CA secret %q is not namespace/name", o.CASecret)
		}
		client, err := o.kube()
		if err != nil {
			return nil, err
		}
		cfg.Store = rotation.SecretStore{Client: client, Namespace: ns, Name: name}
	}
	return rotation.New(cfg)
}

// RotationStatus is what `trustmesh ca rotate --status` shows.
type RotationStatus struct {
	State rotation.State `json:"state"`
	CA    []audit.CACert `json:"ca"`
}

// RotateRequest is one step of CA rotation driven by hand.
type RotateRequest struct {
	// Step is "prepare", "activate" or "status".
	Step string
	// Root, with prepare, rotates the root too.
	Root bool
	// CACertsDir, with prepare, stages that operator-supplied material
	// instead (its key at KeyURI, or the directory's ca-key.pem, referenced
	// in place).
	CACertsDir, KeyURI string
	// Force activates a new root before its propagation time.
	Force bool
	// CASecret ("namespace/name") is where serve keeps the CA with
	// --ca-secret; the rotation state is read and written there.
	CASecret   string
	Kubeconfig string
}

// Rotate drives CA rotation by hand. A running serve picks the change up at
// its next rotation check.
func Rotate(ctx context.Context, dir DataDir, o JournalOptions, req RotateRequest) (*RotationStatus, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, req.Step == "status")
	if err != nil {
		return nil, err
	}
	defer store.Close()
	if req.CASecret != "" {
		o.CASecret = req.CASecret
	}
	if o.Kubeconfig == "" {
		o.Kubeconfig = req.Kubeconfig
	}
	mgr, err := dir.rotationManager(td, store, o)
	if err != nil {
		return nil, err
	}
	switch req.Step {
	case "prepare":
		if req.CACertsDir != "" {
			err = mgr.Stage(ctx, req.CACertsDir, req.KeyURI)
		} else {
			err = mgr.Prepare(ctx, req.Root)
		}
	case "activate":
		err = mgr.Activate(ctx, req.Force)
	case "status":
	default:
		err = fmt.Errorf("controlplane: unknown rotation step %q", req.Step)
	}
	if err != nil {
		return nil, err
	}
	return rotationStatus(ctx, mgr, time.Now())
}

func rotationStatus(ctx context.Context, mgr *rotation.Manager, now time.Time) (*RotationStatus, error) {
	mat, st, err := mgr.Certificates(ctx, now)
	if err != nil {
		return nil, err
	}
	return &RotationStatus{State: st, CA: CACerts(mat, st)}, nil
}

// CACerts describes the CA certificates in force for audits.
func CACerts(mat *authority.Material, st rotation.State) []audit.CACert {
	var out []audit.CACert
	for _, c := range mat.Chain {
		out = append(out, audit.CACert{Role: "intermediate", Subject: c.Subject.CommonName, Serial: c.SerialNumber.Text(16), NotAfter: c.NotAfter, State: "active"})
	}
	for _, r := range mat.Roots {
		state := "trusted"
		switch {
		case mat.Anchor != nil && r.Equal(mat.Anchor):
			state = "active"
		case st.Next != 0 && st.NextIsRoot && !isRetiring(r, st):
			state = "prepared"
		case isRetiring(r, st):
			state = "retiring"
		}
		out = append(out, audit.CACert{Role: "root", Subject: r.Subject.CommonName, Serial: r.SerialNumber.Text(16), NotAfter: r.NotAfter, State: state})
	}
	return out
}

func isRetiring(c *x509.Certificate, st rotation.State) bool {
	for _, r := range st.Retiring {
		if rc, err := pemutil.ParseCertificate([]byte(r.CertPEM)); err == nil && rc.Equal(c) {
			return true
		}
	}
	return false
}
