//go:build pkcs11

package authority_test

// The CA signing key in a real PKCS#11 token (SoftHSM), through trustmesh's
// normal path for operator-supplied material: a cacerts directory whose key
// is named by --ca-key-uri, adopted by the rotation manager, signing through
// the CA. Run by make test with the environment of hack/softhsm.sh:
//
//	eval "$(hack/softhsm.sh start)"
//	go test -tags pkcs11 -count=1 ./ca/authority/

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// softHSM is the token hack/softhsm.sh made.
type softHSM struct {
	module, token, pinFile, pin string
}

func newSoftHSM(t *testing.T) softHSM {
	t.Helper()
	h := softHSM{
		module:  os.Getenv("TRUSTMESH_TEST_PKCS11_MODULE"),
		token:   os.Getenv("TRUSTMESH_TEST_PKCS11_TOKEN"),
		pinFile: os.Getenv("TRUSTMESH_TEST_PKCS11_PIN_FILE"),
	}
	if h.module == "" || h.token == "" || h.pinFile == "" || os.Getenv("SOFTHSM2_CONF") == "" {
		t.Fatal(`no SoftHSM token: run eval "$(hack/softhsm.sh start)" first (make test does)`)
	}
	b, err := os.ReadFile(h.pinFile)
	if err != nil {
		t.Fatal(err)
	}
	h.pin = strings.TrimSpace(string(b))
	if len(h.pin) < 8 {
		t.Fatalf("the test PIN %q is too short to search for", h.pin)
	}
	return h
}

// keyURI names an object in the token, with the PIN in a pin-source file.
func (h softHSM) keyURI(object, query string) string {
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	u := "pkcs11:module-path=" + h.module + ";token=" + h.token + ";id=" + hex.EncodeToString(id) + ";object=" + object
	if query != "" {
		u += "?" + query
	}
	return u
}

// createKey makes a P-256 key in the token and returns its public key.
func (h softHSM) createKey(t *testing.T, keyURI string) crypto.PublicKey {
	t.Helper()
	km, err := kms.New(context.Background(), apiv1.Options{
		URI: "pkcs11:module-path=" + h.module + ";token=" + h.token + "?pin-source=" + h.pinFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer km.Close()
	name, _, _ := strings.Cut(keyURI, "?")
	resp, err := km.CreateKey(&apiv1.CreateKeyRequest{Name: name, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	return resp.PublicKey
}

// caCerts writes Istio's cacerts layout for an intermediate whose key is
// pub (in the token), under a software root, without ca-key.pem.
func caCerts(t *testing.T, td spiffeid.TrustDomain, pub crypto.PublicKey, now time.Time) string {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tdURL := &url.URL{Scheme: "spiffe", Host: td.Name()}
	mk := func(serial int64, cn string, pub crypto.PublicKey, parent *x509.Certificate, parentKey crypto.Signer) *x509.Certificate {
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(30 * 24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, URIs: []*url.URL{tdURL},
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		}
		if parent == nil {
			parent = tmpl
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	root := mk(1, "test root", rootKey.Public(), nil, rootKey)
	inter := mk(2, "token intermediate", pub, root, rootKey)
	dir := t.TempDir()
	for name, certs := range map[string][]*x509.Certificate{
		authority.CACertFile:    {inter},
		authority.CertChainFile: {inter, root},
		authority.RootCertFile:  {root},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), authority.EncodeCertificates(certs...), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func newManager(t *testing.T, td spiffeid.TrustDomain, dataDir string, clk *clocktesting.FakeClock) *rotation.Manager {
	t.Helper()
	mgr, err := rotation.New(rotation.Config{Dir: filepath.Join(dataDir, "ca"), TrustDomain: td, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	return mgr
}

// assertNoPIN fails if the PIN is in any file under dir.
func assertNoPIN(t *testing.T, dir, pin string) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(pin)) {
			t.Errorf("%s holds the PIN", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// inOwnProcess runs the calling test again in a fresh process of this test
// binary and reports whether this is that process, where the body runs.
// PKCS#11 login state belongs to the process: once any test has logged in
// to the token, a wrong or missing PIN is no longer asked for, so a test of
// how the PIN is found must not inherit another test's login.
func inOwnProcess(t *testing.T) bool {
	t.Helper()
	const childEnv = "TRUSTMESH_TEST_PKCS11_CHILD"
	if os.Getenv(childEnv) == t.Name() {
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("%s in its own process: %v\n%s", t.Name(), err, out)
	}
	return false
}

// Every refusal fails closed, writes nothing, and never shows the PIN.
func TestPKCS11RefusalsNeverShowThePIN(t *testing.T) {
	if !inOwnProcess(t) {
		return
	}
	h := newSoftHSM(t)
	ctx := context.Background()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	now := time.Now().Truncate(time.Second)
	keyURI := h.keyURI("refusal-key", "pin-source="+h.pinFile)
	pub := h.createKey(t, keyURI)
	cacerts := caCerts(t, td, pub, now)
	name, _, _ := strings.Cut(keyURI, "?")

	wrongPIN := filepath.Join(t.TempDir(), "wrong-pin")
	if err := os.WriteFile(wrongPIN, []byte("wrong-"+h.pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, uri string
		is        error
	}{
		{"pin-value in the query", name + "?pin-value=" + h.pin, authority.ErrSecretInKeyURI},
		{"pin-value in the path", name + ";pin-value=" + h.pin, authority.ErrSecretInKeyURI},
		{"pin-value beside pin-source", keyURI + "&pin-value=" + h.pin, authority.ErrSecretInKeyURI},
		{"a wrong PIN", name + "?pin-source=" + wrongPIN, nil},
		{"a missing PIN file", name + "?pin-source=" + wrongPIN + ".missing", fs.ErrNotExist},
		{"a missing key", h.keyURI("no-such-key", "pin-source="+h.pinFile), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dataDir := t.TempDir()
			err := newManager(t, td, dataDir, clocktesting.NewFakeClock(now)).Adopt(ctx, cacerts, tc.uri)
			if err == nil {
				t.Fatal("adopted")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v, want %v", err, tc.is)
			}
			if strings.Contains(err.Error(), h.pin) {
				t.Errorf("the error shows the PIN: %v", err)
			}
			entries, _ := os.ReadDir(filepath.Join(dataDir, "ca"))
			if len(entries) != 0 {
				t.Errorf("a refused key URI left %d entries in the CA directory", len(entries))
			}
			assertNoPIN(t, dataDir, h.pin)
		})
	}
}

// The CA signs with a key that never leaves the token: the certificate it
// issues verifies against the bundle, and the PIN, read from the pin-source
// file, is in no file of the data directory.
func TestPKCS11CAKeyInToken(t *testing.T) {
	h := newSoftHSM(t)
	ctx := context.Background()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	now := time.Now().Truncate(time.Second)
	clk := clocktesting.NewFakeClock(now)

	keyURI := h.keyURI("ca-key", "pin-source="+h.pinFile)
	pub := h.createKey(t, keyURI)
	cacerts := caCerts(t, td, pub, now)

	dataDir := t.TempDir()
	mgr := newManager(t, td, dataDir, clk)
	if err := mgr.Adopt(ctx, cacerts, keyURI); err != nil {
		t.Fatal(err)
	}
	mat, err := mgr.Initial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, soft := mat.Signer.(interface{ Seed() []byte }); soft || !publicEqual(mat.Signer.Public(), pub) {
		t.Fatalf("the CA signs with %T, not the token's key", mat.Signer)
	}

	_, ckey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cs, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", ckey)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(dataDir, "journal.db"), Signer: cs})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	auth := authority.New(td, mat)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: auth, Recorder: store, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	alice := spiffeid.RequireFromPath(td, "/ns/default/sa/alice")
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{alice.URL()}}, leafKey)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := c.Issue(ctx, ca.Caller{ID: alice, Method: "kubernetes", Subject: "system:serviceaccount:default:alice", Origin: journal.OriginKubernetes},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), 0)
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := x509svid.Verify(append([]*x509.Certificate{issued.Leaf}, issued.Chain...), auth, x509svid.WithTime(now))
	if err != nil || id != alice {
		t.Fatalf("issued certificate: id %s, verify error %v", id, err)
	}
	if err := issued.Leaf.CheckSignatureFrom(mat.Cert); err != nil || !publicEqual(mat.Cert.PublicKey, pub) {
		t.Fatalf("the leaf is not signed by the token's key: %v", err)
	}

	// The URI is stored as given, naming the PIN file, never the PIN.
	stored, err := filepath.Glob(filepath.Join(dataDir, "ca", "*", authority.CAKeyURIFile))
	if err != nil || len(stored) != 1 {
		t.Fatalf("stored key URIs: %v %v", stored, err)
	}
	if b, _ := os.ReadFile(stored[0]); string(b) != keyURI {
		t.Fatalf("%s = %q, want %q", stored[0], b, keyURI)
	}
	assertNoPIN(t, dataDir, h.pin)
}

// The PIN may come from TRUSTMESH_PKCS11_PIN instead of a file.
func TestPKCS11PINFromEnvironment(t *testing.T) {
	if !inOwnProcess(t) {
		return
	}
	h := newSoftHSM(t)
	keyURI := h.keyURI("env-key", "")
	pub := h.createKey(t, keyURI)
	t.Setenv(authority.PINEnv, h.pin)
	signer, err := authority.OpenSigner(context.Background(), keyURI)
	if err != nil {
		t.Fatal(err)
	}
	if !publicEqual(signer.Public(), pub) {
		t.Fatal("opened a different key")
	}
}

func publicEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}
