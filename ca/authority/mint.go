package authority

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/keyutil"
	"go.step.sm/crypto/x509util"
)

// DefaultBackdate is how far before their creation self-managed CA
// certificates become valid, to cover clock skew between the CA and
// relying parties.
const DefaultBackdate = 5 * time.Minute

// MintRequest asks for one self-managed CA certificate: a root when Parent
// is nil, else an intermediate under Parent.
type MintRequest struct {
	TrustDomain spiffeid.TrustDomain
	// Parent and ParentKey sign an intermediate; nil for a root.
	Parent    *x509.Certificate
	ParentKey crypto.Signer
	// Now is the creation time; the certificate is valid from Now-Backdate
	// to Now+Lifetime, and never beyond its parent.
	Now      time.Time
	Lifetime time.Duration
	// Backdate defaults to DefaultBackdate.
	Backdate time.Duration
}

// Mint creates a CA certificate and its key (ECDSA P-256), the one way
// trustmesh makes its own roots and intermediates:
//
//   - the subject is O=trustmesh, CN="trustmesh <root|intermediate> <trust
//     domain> <creation time, RFC 3339 UTC>", so that every generation is
//     told apart in audits;
//   - the only SAN is the trust domain's SPIFFE ID;
//   - it may sign certificates and CRLs, nothing else;
//   - a root has no path length limit (operators may chain their own
//     intermediates under a staged root); an intermediate has path length 0:
//     it signs workloads only.
//
// The minted certificate is parsed back and verified under its parent (a
// root under itself) at Now before it is returned.
func Mint(r MintRequest) (*x509.Certificate, crypto.Signer, error) {
	if r.Backdate == 0 {
		r.Backdate = DefaultBackdate
	}
	var errs []error
	if r.TrustDomain.IsZero() {
		errs = append(errs, errors.New("a trust domain is required"))
	}
	if r.Lifetime <= 0 {
		errs = append(errs, fmt.Errorf("lifetime %s must be positive", r.Lifetime))
	}
	if r.Backdate < 0 {
		errs = append(errs, fmt.Errorf("backdate %s must not be negative", r.Backdate))
	}
	if (r.Parent == nil) != (r.ParentKey == nil) {
		errs = append(errs, errors.New("an intermediate needs both its parent certificate and key"))
	}
	if len(errs) > 0 {
		return nil, nil, fmt.Errorf("authority: mint: %w", errors.Join(errs...))
	}
	role := "intermediate"
	if r.Parent == nil {
		role = "root"
	}
	key, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return nil, nil, fmt.Errorf("authority: generate %s key: %w", role, err)
	}
	tmpl := &x509.Certificate{
		Subject: pkix.Name{
			Organization: []string{"trustmesh"},
			CommonName:   fmt.Sprintf("trustmesh %s %s %s", role, r.TrustDomain.Name(), r.Now.UTC().Format(time.RFC3339)),
		},
		URIs:                  []*url.URL{r.TrustDomain.ID().URL()},
		NotBefore:             r.Now.Add(-r.Backdate),
		NotAfter:              r.Now.Add(r.Lifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	parent, parentKey := r.Parent, r.ParentKey
	if parent == nil {
		parent, parentKey = tmpl, key
	} else {
		tmpl.MaxPathLenZero = true
		if tmpl.NotAfter.After(parent.NotAfter) {
			tmpl.NotAfter = parent.NotAfter
		}
	}
	cert, err := x509util.CreateCertificate(tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, nil, fmt.Errorf("authority: create %s: %w", role, err)
	}
	if r.Parent == nil {
		parent = cert
	}
	if err := verifyMinted(cert, parent, r.Now); err != nil {
		return nil, nil, fmt.Errorf("authority: minted %s does not verify: %w", role, err)
	}
	return cert, key, nil
}

// verifyMinted checks a freshly minted CA certificate as a relying party
// would: it parses, chains to parent at now, and is a CA.
func verifyMinted(cert, parent *x509.Certificate, now time.Time) error {
	parsed, err := x509.ParseCertificate(cert.Raw)
	if err != nil {
		return err
	}
	if !parsed.IsCA || !parsed.BasicConstraintsValid {
		return errors.New("not a CA")
	}
	roots := x509.NewCertPool()
	roots.AddCert(parent)
	if _, err := parsed.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return err
	}
	if !bytes.Equal(parsed.RawIssuer, parent.RawSubject) {
		return errors.New("issuer is not the parent's subject")
	}
	return nil
}

// Lifetimes of a self-managed generation; zero values take the defaults
// (RootLifetime, IntermediateLifetime, DefaultBackdate).
type Lifetimes struct {
	Root, Intermediate, Backdate time.Duration
}

// NewSelfManagedFiles mints a root and an intermediate under it, as the
// files of Istio's cacerts layout plus the root key, in memory.
func NewSelfManagedFiles(td spiffeid.TrustDomain, now time.Time, l Lifetimes) (map[string][]byte, error) {
	if l.Root <= 0 {
		l.Root = RootLifetime
	}
	if l.Intermediate <= 0 {
		l.Intermediate = IntermediateLifetime
	}
	root, rootKey, err := Mint(MintRequest{TrustDomain: td, Now: now, Lifetime: l.Root, Backdate: l.Backdate})
	if err != nil {
		return nil, err
	}
	inter, interKey, err := Mint(MintRequest{TrustDomain: td, Parent: root, ParentKey: rootKey, Now: now, Lifetime: l.Intermediate, Backdate: l.Backdate})
	if err != nil {
		return nil, err
	}
	return GenerationFiles(root, rootKey, inter, interKey)
}

// GenerationFiles lays out a self-managed root and intermediate as Istio's
// cacerts files plus the root key.
func GenerationFiles(root *x509.Certificate, rootKey crypto.Signer, inter *x509.Certificate, interKey crypto.Signer) (map[string][]byte, error) {
	rootKeyPEM, err := EncodeKey(rootKey)
	if err != nil {
		return nil, err
	}
	interKeyPEM, err := EncodeKey(interKey)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		RootKeyFile:   rootKeyPEM,
		CAKeyFile:     interKeyPEM,
		RootCertFile:  certPEM(root),
		CACertFile:    certPEM(inter),
		CertChainFile: certPEM(inter, root),
	}, nil
}
