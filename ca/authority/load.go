package authority

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/pemutil"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// The file names of Istio's cacerts layout, which trustmesh also uses for the
// material it manages itself.
const (
	CACertFile    = "ca-cert.pem"
	CAKeyFile     = "ca-key.pem"
	CertChainFile = "cert-chain.pem"
	RootCertFile  = "root-cert.pem"
	// RootKeyFile exists only for self-managed material; trustmesh needs the
	// root key to sign the next intermediate.
	RootKeyFile = "root-key.pem"
)

// Lifetimes of self-managed CA certificates.
const (
	RootLifetime         = 10 * 365 * 24 * time.Hour
	IntermediateLifetime = 365 * 24 * time.Hour
)

// ReadCACerts reads operator-supplied material from dir for staging: the
// certificates, and a reference to the signing key (keyURI, or the
// directory's ca-key.pem) instead of the key.
func ReadCACerts(dir, keyURI string) (map[string][]byte, error) {
	files := map[string][]byte{}
	var errs []error
	for _, name := range []string{CACertFile, CertChainFile, RootCertFile} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		files[name] = b
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("authority: %w", errors.Join(errs...))
	}
	if keyURI == "" {
		var err error
		if keyURI, err = SoftKMSURI(filepath.Join(dir, CAKeyFile)); err != nil {
			return nil, err
		}
	} else if err := CheckKeyURI(keyURI); err != nil {
		// The URI is stored with the CA (ca-key-uri): refuse a PIN in it
		// before anything is written.
		return nil, err
	}
	files[CAKeyURIFile] = []byte(keyURI)
	return files, nil
}

// OpenSigner returns the signing key named by a KMS key URI. Only softkms is
// built in; other KMS back ends are linked in by build tag. The URI is first
// checked with CheckKeyURI; a PKCS#11 PIN comes from the URI's pin-source
// file or PINEnv and stays in memory. Errors show the URI redacted.
func OpenSigner(ctx context.Context, keyURI string) (crypto.Signer, error) {
	u, typ, err := parseKeyURI(keyURI)
	if err != nil {
		return nil, err
	}
	opts := apiv1.Options{URI: keyURI}
	if typ == apiv1.PKCS11 {
		if opts.Pin, err = pkcs11PIN(u); err != nil {
			return nil, fmt.Errorf("authority: key URI %s: %w", RedactKeyURI(keyURI), err)
		}
	}
	km, err := kms.New(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("authority: open KMS for %s: %w", RedactKeyURI(keyURI), err)
	}
	signer, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: keyURI})
	if err != nil {
		_ = km.Close()
		return nil, fmt.Errorf("authority: open signing key %s: %w", RedactKeyURI(keyURI), err)
	}
	return signer, nil
}

func parseMaterial(readFile func(name string) ([]byte, error), signer crypto.Signer) (*Material, error) {
	var errs []error
	read := func(name string) []*x509.Certificate {
		data, err := readFile(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			return nil
		}
		certs, err := pemutil.ParseCertificateBundle(data)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
		return certs
	}
	caCerts, chain, roots := read(CACertFile), read(CertChainFile), read(RootCertFile)
	if len(errs) > 0 {
		return nil, fmt.Errorf("authority: %w", errors.Join(errs...))
	}
	if len(caCerts) != 1 {
		return nil, fmt.Errorf("authority: %s must hold exactly one certificate, found %d", CACertFile, len(caCerts))
	}
	m := &Material{Signer: signer, Cert: caCerts[0], Roots: roots}
	// cert-chain.pem runs from ca-cert.pem up to and often including the
	// root; the chain carried in issued certificates stops below the roots.
	for _, c := range chain {
		if isIn(c, roots) {
			continue
		}
		m.Chain = append(m.Chain, c)
	}
	if len(m.Chain) == 0 || !m.Chain[0].Equal(m.Cert) {
		m.Chain = append([]*x509.Certificate{m.Cert}, m.Chain...)
	}
	return m, nil
}

// Validate checks that material is usable at now: the signer owns the issuing
// certificate, every certificate is a valid CA, and the chain verifies to a
// root of the bundle.
func Validate(m *Material, now time.Time) error {
	var errs []error
	if !publicKeyEqual(m.Signer.Public(), m.Cert.PublicKey) {
		errs = append(errs, errors.New("the signing key does not belong to the CA certificate"))
	}
	if len(m.Roots) == 0 {
		errs = append(errs, errors.New("the trust bundle holds no root"))
	}
	for _, c := range append(append([]*x509.Certificate{}, m.Chain...), m.Roots...) {
		if !c.IsCA || !c.BasicConstraintsValid {
			errs = append(errs, fmt.Errorf("certificate %q is not a CA", c.Subject))
		}
		if c.KeyUsage != 0 && c.KeyUsage&x509.KeyUsageCertSign == 0 {
			errs = append(errs, fmt.Errorf("certificate %q may not sign certificates", c.Subject))
		}
	}
	for _, r := range m.Roots {
		if err := r.CheckSignatureFrom(r); err != nil || !bytes.Equal(r.RawIssuer, r.RawSubject) {
			errs = append(errs, fmt.Errorf("root %q is not self-signed; intermediates never enter the trust bundle", r.Subject))
		}
	}
	if now.Before(m.Cert.NotBefore) || !now.Before(m.Cert.NotAfter) {
		errs = append(errs, fmt.Errorf("CA certificate %q is not valid now (valid %s to %s)",
			m.Cert.Subject, m.Cert.NotBefore.Format(time.RFC3339), m.Cert.NotAfter.Format(time.RFC3339)))
	}
	if len(errs) == 0 {
		roots, inter := x509.NewCertPool(), x509.NewCertPool()
		for _, r := range m.Roots {
			roots.AddCert(r)
		}
		for _, c := range m.Chain[1:] {
			inter.AddCert(c)
		}
		chains, err := m.Cert.Verify(x509.VerifyOptions{
			Roots: roots, Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("the CA certificate does not chain to the trust bundle: %w", err))
		} else {
			m.Anchor = chains[0][len(chains[0])-1]
		}
	}
	return errors.Join(errs...)
}

// CAKeyURIFile, in place of ca-key.pem, names where operator-supplied
// material's signing key lives (a KMS or the operator's own file), so that
// the key itself is never copied.
const CAKeyURIFile = "ca-key-uri"

// Generate creates fresh self-managed material in memory: a root and an
// intermediate of interLife (zero for a year), loaded through the software
// KMS like any other.
func Generate(ctx context.Context, td spiffeid.TrustDomain, now time.Time, interLife time.Duration) (*Material, error) {
	files, err := NewSelfManagedFiles(td, now, Lifetimes{Intermediate: interLife})
	if err != nil {
		return nil, err
	}
	return LoadFiles(ctx, files, "", now)
}

// LoadFiles returns the material held in files (Istio's cacerts layout),
// checked at now. The signing key is the one keyURI names, else the one
// ca-key-uri names, else ca-key.pem.
func LoadFiles(ctx context.Context, files map[string][]byte, keyURI string, now time.Time) (*Material, error) {
	var signer crypto.Signer
	var err error
	if keyURI == "" {
		keyURI = strings.TrimSpace(string(files[CAKeyURIFile]))
	}
	if keyURI != "" {
		signer, err = OpenSigner(ctx, keyURI)
	} else if len(files[CAKeyFile]) == 0 {
		_, present := files[CAKeyFile]
		return nil, fmt.Errorf("authority: %s is %s", CAKeyFile, map[bool]string{true: "empty", false: "missing"}[present])
	} else if signer, err = SignerFromPEM(ctx, files[CAKeyFile]); err != nil {
		return nil, fmt.Errorf("authority: %s (%d bytes) is not a usable key: %w", CAKeyFile, len(files[CAKeyFile]), err)
	}
	if err != nil {
		return nil, err
	}
	m, err := parseMaterial(fileReader(files), signer)
	if err != nil {
		return nil, err
	}
	if err := Validate(m, now); err != nil {
		return nil, fmt.Errorf("authority: %w", err)
	}
	if err := checkRootKey(ctx, files, keyURI, m); err != nil {
		return nil, err
	}
	return m, nil
}

// ErrRootKeyMissing refuses a generation trustmesh minted whose root key
// has gone: taken for operator-supplied material, it would load, sign, and
// silently never rotate again.
var ErrRootKeyMissing = errors.New("authority: " + RootKeyFile + " is missing from a CA that trustmesh minted itself")

// SelfManaged reports whether files are a generation trustmesh minted
// itself, root and all, and so rotates itself with the root key. Minted
// material holds its intermediate key in the store (ca-key.pem);
// operator-supplied material never does: its key stays where the operator
// keeps it, named by ca-key-uri. Material that holds its own ca-key.pem but
// no root-key.pem is therefore minted material whose root key was lost,
// and is refused (ErrRootKeyMissing) rather than read as operator-supplied.
func SelfManaged(files map[string][]byte) (bool, error) {
	if _, ok := files[RootKeyFile]; ok {
		return true, nil
	}
	if _, ok := files[CAKeyFile]; ok && len(bytes.TrimSpace(files[CAKeyURIFile])) == 0 {
		return false, fmt.Errorf("%w (it holds its own %s, where operator-supplied material names its key in %s), "+
			"and without its root key no next intermediate can be minted; restore %s from a backup "+
			"(to run a CA without its root key, supply it with serve --cacerts)",
			ErrRootKeyMissing, CAKeyFile, CAKeyURIFile, RootKeyFile)
	}
	return false, nil
}

// checkRootKey opens a self-managed generation's root key, when the files
// hold one, and checks that it is a root's: a corrupt root key would
// otherwise pass every start and fail only at the next rotation. A minted
// generation without its root key is refused (SelfManaged), unless the key
// is named by keyURI, as for an operator's --cacerts with --ca-key-uri.
func checkRootKey(ctx context.Context, files map[string][]byte, keyURI string, m *Material) error {
	b, ok := files[RootKeyFile]
	if !ok {
		if keyURI != "" {
			return nil
		}
		_, err := SelfManaged(files)
		return err
	}
	if len(b) == 0 {
		return fmt.Errorf("authority: %s is empty", RootKeyFile)
	}
	signer, err := SignerFromPEM(ctx, b)
	if err != nil {
		return fmt.Errorf("authority: %s (%d bytes) is not a usable key: %w", RootKeyFile, len(b), err)
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return fmt.Errorf("authority: %s: unsupported key type %T", RootKeyFile, signer.Public())
	}
	for _, r := range m.Roots {
		if pub.Equal(r.PublicKey) {
			return nil
		}
	}
	return fmt.Errorf("authority: %s is the key of none of the roots in %s", RootKeyFile, RootCertFile)
}

// ReadCertificates parses material's certificates without its key and
// without judging them at any time, for readers that must not need the key
// and must still see a CA that has expired: the trust bundle, audits.
// Anchor is the root whose key signed the chain's last certificate.
func ReadCertificates(files map[string][]byte) (*Material, error) {
	m, err := parseMaterial(fileReader(files), nil)
	if err != nil {
		return nil, err
	}
	top := m.Chain[len(m.Chain)-1]
	for _, r := range m.Roots {
		if top.CheckSignatureFrom(r) == nil {
			m.Anchor = r
			break
		}
	}
	return m, nil
}

// fileReader reads material's files from a map of them.
func fileReader(files map[string][]byte) func(name string) ([]byte, error) {
	return func(name string) ([]byte, error) {
		if b, ok := files[name]; ok {
			return b, nil
		}
		return nil, fs.ErrNotExist
	}
}

// SignerFromPEM opens a PEM key through the software KMS, so that even keys
// held in a Kubernetes Secret reach the signing code only as a crypto.Signer.
func SignerFromPEM(ctx context.Context, keyPEM []byte) (crypto.Signer, error) {
	if len(keyPEM) == 0 {
		return nil, fmt.Errorf("authority: %s is missing", CAKeyFile)
	}
	km, err := kms.New(ctx, apiv1.Options{Type: apiv1.SoftKMS})
	if err != nil {
		return nil, fmt.Errorf("authority: %w", err)
	}
	signer, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKeyPEM: keyPEM})
	if err != nil {
		return nil, fmt.Errorf("authority: open signing key: %w", err)
	}
	return signer, nil
}

// WriteKeyFile writes a private key as owner-only PKCS#8 PEM, atomically.
func WriteKeyFile(path string, key crypto.Signer) error {
	data, err := EncodeKey(key)
	if err != nil {
		return fmt.Errorf("%w (for %s)", err, path)
	}
	return writeFileAtomic(path, data)
}

// SoftKMSURI is the KMS URI of a key file.
func SoftKMSURI(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("authority: %w", err)
	}
	return (&url.URL{Scheme: "softkms", Opaque: "path=" + abs}).String(), nil
}

// EncodeCertificates returns certs as concatenated PEM blocks.
func EncodeCertificates(certs ...*x509.Certificate) []byte { return certPEM(certs...) }

func certPEM(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// EncodeKey returns a private key as PKCS#8 PEM ("PRIVATE KEY"), the one
// encoding trustmesh writes keys in: files, generations, Secrets. It fails
// for a signer whose key cannot leave it, such as a KMS key.
func EncodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("authority: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFileAtomic writes an owner-only file durably, so a crash never
// leaves a half-written key or certificate.
func writeFileAtomic(path string, data []byte) error {
	if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("authority: %w", err)
	}
	return nil
}

func isIn(c *x509.Certificate, set []*x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}
