// Package ca is trustmesh's signing core: it turns an authenticated caller and
// a CSR into an X.509-SVID, enforcing that the CA, never the CSR, decides the
// identity, verifying every certificate it mints, and recording each one
// durably before it is handed out.
package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/tracing"
)

// Default workload certificate lifetimes.
const (
	DefaultTTL    = time.Hour
	DefaultMinTTL = 5 * time.Minute
	DefaultMaxTTL = 24 * time.Hour
	// DefaultBackdate is how far before issuance a workload certificate
	// becomes valid, to cover small clock skew between the CA and its
	// peers.
	DefaultBackdate = 30 * time.Second
)

// Caller is an authenticated caller: who it is and how it proved it.
type Caller struct {
	ID spiffeid.ID
	// Method is how this request authenticated: "kubernetes", "join-token"
	// or "x509-renewal".
	Method string
	// Subject names the credential: a token's subject, a join-token id, or
	// the serial of the certificate being renewed.
	Subject     string
	Origin      journal.Origin
	EnrolmentID string
	SubjectUID  string
	// Redeem, when set, is the join token spent by this issuance.
	Redeem *journal.Redemption
	// Node is the node that asks on the workload's behalf, for a delegated
	// issuance; empty otherwise.
	Node string
}

// Recorder durably records issuances. It must return only once the record is
// durable; an error means nothing was recorded.
type Recorder interface {
	RecordIssuance(ctx context.Context, iss journal.Issuance, redeem *journal.Redemption) (int64, error)
	// Integrity is nil while the record matches what was signed into it.
	// Otherwise the CA signs nothing: its authentication rests on the
	// record.
	Integrity() error
}

// Authority is the key material the CA signs with, and the bundle it
// verifies against.
type Authority interface {
	Current() *authority.Material
	x509bundle.Source
}

// Config configures a CA.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	Authority   Authority
	Recorder    Recorder
	Clock       clock.PassiveClock
	// DefaultTTL applies when a caller asks for no lifetime; MinTTL and
	// MaxTTL clamp what callers ask for.
	DefaultTTL, MinTTL, MaxTTL time.Duration
	// Backdate is how far before issuance workload certificates become
	// valid. Default DefaultBackdate. It counts in a certificate's life:
	// an agent that renews at half-life renews (TTL-Backdate)/2 after
	// issuance, so it must stay well below MinTTL.
	Backdate time.Duration
	// MaxClockSkew is how far the clock may be behind the journal's newest
	// issuance before the CA stops signing. Default DefaultMaxClockSkew.
	MaxClockSkew time.Duration
	// Reserved identities are never issued to workloads, whatever they
	// prove: the control plane's own, which xDS clients pin.
	Reserved []spiffeid.ID
	// Nodes authorizes delegated issuance against the mesh model. Nil
	// turns delegation off: every delegated request is refused.
	Nodes NodeAuthorizer
}

// CA issues workload certificates.
type CA struct {
	cfg Config
	// delegated bounds the delegated params in flight across all nodes
	// and batches (DelegatedLimit).
	delegated chan struct{}
	// link is the issuing chain last verified by a self-check, for the
	// generation of key material it belongs to.
	link atomic.Pointer[chainLink]
	// tail is the PEM of the chain and root that every certificate of one
	// generation of key material is returned with (chainPEM).
	tail atomic.Pointer[pemTail]
}

// New validates cfg, fills in defaults and returns a CA.
func New(cfg Config) (*CA, error) {
	if cfg.DefaultTTL == 0 {
		cfg.DefaultTTL = DefaultTTL
	}
	if cfg.MinTTL == 0 {
		cfg.MinTTL = DefaultMinTTL
	}
	if cfg.MaxTTL == 0 {
		cfg.MaxTTL = DefaultMaxTTL
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Backdate == 0 {
		cfg.Backdate = DefaultBackdate
	}
	if cfg.MaxClockSkew == 0 {
		cfg.MaxClockSkew = DefaultMaxClockSkew
	}
	var errs []error
	if cfg.TrustDomain.IsZero() {
		errs = append(errs, errors.New("a trust domain is required"))
	}
	if cfg.Authority == nil {
		errs = append(errs, errors.New("an authority is required"))
	}
	if cfg.Recorder == nil {
		errs = append(errs, errors.New("a recorder is required: the CA never issues what it cannot record"))
	}
	if cfg.MinTTL <= 0 || cfg.MinTTL > cfg.MaxTTL {
		errs = append(errs, fmt.Errorf("minimum workload TTL %s must be positive and at most the maximum %s", cfg.MinTTL, cfg.MaxTTL))
	}
	if cfg.DefaultTTL < cfg.MinTTL || cfg.DefaultTTL > cfg.MaxTTL {
		errs = append(errs, fmt.Errorf("default workload TTL %s is outside [%s, %s]", cfg.DefaultTTL, cfg.MinTTL, cfg.MaxTTL))
	}
	if cfg.Backdate < 0 {
		errs = append(errs, fmt.Errorf("workload certificate backdate %s must not be negative", cfg.Backdate))
	}
	if cfg.MaxClockSkew < 0 {
		errs = append(errs, fmt.Errorf("clock skew allowance %s must not be negative", cfg.MaxClockSkew))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("ca: %w", errors.Join(errs...))
	}
	return &CA{cfg: cfg, delegated: make(chan struct{}, DelegatedLimit)}, nil
}

// TrustDomain is the trust domain the CA issues for.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.cfg.TrustDomain }

// Issued is a minted, verified and recorded certificate with what a relying
// party needs to verify it.
type Issued struct {
	Leaf *x509.Certificate
	// Chain is the issuing CA certificate and any further intermediates.
	Chain []*x509.Certificate
	// Anchor is the root the chain ends at.
	Anchor *x509.Certificate
	// Seq is the record's position in the journal.
	Seq int64
	// tail is the PEM of Chain and Anchor, shared by the certificates of
	// one generation (PEMChain).
	tail *pemTail
}

// PEMChain returns the leaf, the intermediates and the root, one PEM
// certificate per element, in that order, as Istio's API returns them.
// The intermediates and the root are encoded once per generation of key
// material, not per certificate, and shared.
func (i *Issued) PEMChain() []string {
	tail := i.tail
	if !tail.of(i.Chain, i.Anchor) {
		tail = newPEMTail(i.Chain, i.Anchor)
	}
	return append(append(make([]string, 0, 1+len(tail.pem)), certPEM(i.Leaf)), tail.pem...)
}

// pemTail is the PEM of an issuing chain and its root, in PEMChain's
// order, with the certificates it encodes: its own copy of the chain, so
// that a chain slice changed in place no longer matches it. A
// certificate's Raw bytes changed in place would go unnoticed; nothing
// changes a parsed certificate.
type pemTail struct {
	chain  []*x509.Certificate
	anchor *x509.Certificate
	pem    []string
}

func newPEMTail(chain []*x509.Certificate, anchor *x509.Certificate) *pemTail {
	t := &pemTail{chain: slices.Clone(chain), anchor: anchor, pem: make([]string, 0, len(chain)+1)}
	for _, c := range chain {
		t.pem = append(t.pem, certPEM(c))
	}
	t.pem = append(t.pem, certPEM(anchor))
	return t
}

// of reports whether t encodes exactly chain and anchor.
func (t *pemTail) of(chain []*x509.Certificate, anchor *x509.Certificate) bool {
	return t != nil && t.anchor == anchor && slices.Equal(t.chain, chain)
}

// chainPEM returns the PEM tail of the certificates m issues, encoded once
// per generation: m is replaced, never changed, when the authority rotates.
func (c *CA) chainPEM(m *authority.Material) *pemTail {
	if t := c.tail.Load(); t.of(m.Chain, m.Anchor) {
		return t
	}
	t := newPEMTail(m.Chain, m.Anchor)
	c.tail.Store(t)
	return t
}

// certPEM is c's PEM encoding, written into a string sized for it.
func certPEM(c *x509.Certificate) string {
	const begin, end = "-----BEGIN CERTIFICATE-----\n", "-----END CERTIFICATE-----\n"
	n := base64.StdEncoding.EncodedLen(len(c.Raw))
	var b strings.Builder
	b.Grow(len(begin) + n + (n+63)/64 + len(end))
	// pem.Encode fails only when its writer does; a strings.Builder does
	// not.
	_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	return b.String()
}

// Issue mints a workload certificate for an authenticated caller. The CSR
// contributes only its key; requested is the lifetime the caller asked for
// (zero for the default). The certificate is verified against the current
// bundle and durably recorded before it is returned.
func (c *CA) Issue(ctx context.Context, caller Caller, csrPEM []byte, requested time.Duration) (*Issued, error) {
	if caller.ID.TrustDomain() != c.cfg.TrustDomain {
		return nil, refuse(ReasonTrustDomain, KindDenied, "identity %s is not in trust domain %s", caller.ID, c.cfg.TrustDomain)
	}
	for _, r := range c.cfg.Reserved {
		if caller.ID == r {
			return nil, refuse(ReasonReserved, KindDenied, "%s is reserved for the control plane", r)
		}
	}
	csr, err := parseCSR(csrPEM, caller.ID)
	if err != nil {
		return nil, err
	}
	return c.issue(ctx, caller, workloadTemplate(caller.ID, csr.PublicKey), csr.PublicKey, c.clampTTL(requested))
}

// workloadTemplate is a workload certificate for id with key pub: one URI
// SAN, and the key usages the key's type allows.
func workloadTemplate(id spiffeid.ID, pub crypto.PublicKey) *x509.Certificate {
	usage := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	return &x509.Certificate{URIs: []*url.URL{id.URL()}, KeyUsage: usage}
}

// ServingRequest asks for a certificate for one of trustmesh's own servers.
type ServingRequest struct {
	ID        spiffeid.ID
	DNSNames  []string
	IPs       []net.IP
	PublicKey crypto.PublicKey
	TTL       time.Duration
}

// IssueServing mints a certificate for trustmesh's own servers, with DNS and
// IP names beside the SPIFFE ID. It is recorded like every issuance, and can
// never be renewed by a client.
func (c *CA) IssueServing(ctx context.Context, req ServingRequest) (*Issued, error) {
	caller := Caller{ID: req.ID, Method: "ca", Subject: "trustmesh", Origin: journal.OriginCA}
	return c.issue(ctx, caller, &x509.Certificate{
		URIs:        []*url.URL{req.ID.URL()},
		DNSNames:    req.DNSNames,
		IPAddresses: req.IPs,
		KeyUsage:    x509.KeyUsageDigitalSignature,
	}, req.PublicKey, req.TTL)
}

func (c *CA) clampTTL(requested time.Duration) time.Duration {
	switch {
	case requested <= 0:
		return c.cfg.DefaultTTL
	case requested < c.cfg.MinTTL:
		return c.cfg.MinTTL
	case requested > c.cfg.MaxTTL:
		return c.cfg.MaxTTL
	}
	return requested
}

func (c *CA) issue(ctx context.Context, caller Caller, tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration) (*Issued, error) {
	if err := c.cfg.Recorder.Integrity(); err != nil {
		return nil, refuseErr(ReasonJournalTampered, KindUnavailable, err)
	}
	leaf, m, now, err := c.sign(ctx, caller.ID, tmpl, pub, ttl)
	if err != nil {
		return nil, err
	}
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	sum := sha256.Sum256(leaf.Raw)
	seq, err := c.cfg.Recorder.RecordIssuance(ctx, journal.Issuance{
		Time:            now,
		Serial:          SerialHex(leaf),
		SPIFFEID:        caller.ID.String(),
		Method:          caller.Method,
		Caller:          caller.Subject,
		Origin:          caller.Origin,
		EnrolmentID:     caller.EnrolmentID,
		SubjectUID:      caller.SubjectUID,
		NotBefore:       leaf.NotBefore,
		NotAfter:        leaf.NotAfter,
		Issuer:          SerialHex(m.Cert),
		PublicKeySHA256: hex.EncodeToString(spki[:]),
		CertSHA256:      hex.EncodeToString(sum[:]),
		Node:            caller.Node,
	}, caller.Redeem)
	if err != nil {
		if errors.Is(err, journal.ErrTokenSpent) {
			return nil, refuseErr(ReasonJoinTokenUsed, KindUnauthenticated, err)
		}
		if errors.Is(err, journal.ErrUnavailable) {
			// The database is out of reach or out of room: nothing was
			// recorded, so nothing is issued, and the caller may retry.
			return nil, refuseErr(ReasonJournalUnavailable, KindUnavailable, err)
		}
		return nil, refuseErr(ReasonRecordFailed, KindInternal, err)
	}
	return &Issued{Leaf: leaf, Chain: m.Chain, Anchor: m.Anchor, Seq: seq, tail: c.chainPEM(m)}, nil
}

// Tracing: the ca.sign span, a child of the certificate service's ca.Issue
// span when that one is recording.
const (
	tracerName   = "trustmesh/ca"
	SpanSign     = "ca.sign"
	AttrSPIFFEID = "ca.spiffe_id"
)

// sign mints a certificate for id under the authority in force and
// verifies it (selfCheck); nothing is recorded yet.
func (c *CA) sign(ctx context.Context, id spiffeid.ID, tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration) (
	_ *x509.Certificate, _ *authority.Material, now time.Time, err error) {
	_, span := tracing.Child(ctx, tracerName, SpanSign)
	if span.IsRecording() {
		span.SetAttributes(attribute.String(AttrSPIFFEID, id.String()))
	}
	defer func() {
		if err != nil {
			span.SetStatus(codes.Error, "not signed")
		}
		span.End()
	}()
	m := c.cfg.Authority.Current()
	now = c.cfg.Clock.Now()
	if err := c.checkClock(ctx, now, m); err != nil {
		return nil, nil, now, err
	}
	serial, err := newSerial(now)
	if err != nil {
		return nil, nil, now, refuseErr(ReasonSignFailed, KindInternal, err)
	}
	notAfter := now.Add(ttl)
	if notAfter.After(m.Cert.NotAfter) {
		// Never outlive the issuer; rotation keeps this from biting.
		notAfter = m.Cert.NotAfter
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-c.cfg.Backdate)
	tmpl.NotAfter = notAfter
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	tmpl.BasicConstraintsValid = true
	tmpl.IsCA = false
	// The signer is the material's key, reporting the issuing
	// certificate's public key as its own: CreateCertificate verifies the
	// signature it gets back under the signer's Public(), so the leaf's
	// signature is checked under m.Cert's key there (see selfCheck).
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.Cert, pub, issuerSigner{Signer: m.Signer, cert: m.Cert})
	if err != nil {
		return nil, nil, now, refuseErr(ReasonSignFailed, KindInternal, fmt.Errorf("sign: %w", err))
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, now, refuseErr(ReasonSignFailed, KindInternal, fmt.Errorf("parse minted certificate: %w", err))
	}
	if err := c.selfCheck(leaf, m, id, now, notAfter); err != nil {
		return nil, nil, now, refuseErr(ReasonSelfCheckFailed, KindInternal, err)
	}
	return leaf, m, now, nil
}

// issuerSigner signs with an issuing key and reports the issuing
// certificate's public key as its Public(), whatever the key behind it says.
//
// x509.CreateCertificate checks the signature a crypto.Signer returns, under
// that signer's Public(), before it returns a certificate ("x509: signature
// returned by signer is invalid"; crypto/x509 signTBS). With Public() pinned
// to the issuing certificate's key, that check is exactly
// leaf.CheckSignatureFrom(cert)'s signature check: the same TBS bytes, the
// same signature, the same public key. A key that is not the certificate's,
// a signer whose Public() lies, or one that returns garbage is refused there,
// and the CA issues nothing. TestSignerMisbehaving holds Go to it.
type issuerSigner struct {
	crypto.Signer
	cert *x509.Certificate
}

func (s issuerSigner) Public() crypto.PublicKey { return s.cert.PublicKey }

// selfCheck verifies a freshly minted certificate as a relying party would:
// it chains to the current bundle at now, names exactly the caller's SPIFFE
// ID, is no CA, and is valid for the window it was minted for.
//
// The leaf's own signature under the issuing certificate's key is already
// verified, by x509.CreateCertificate itself, on every issuance (see
// issuerSigner); it is not verified a second time here. What remains of
// CheckSignatureFrom, that the issuing certificate may sign certificates,
// and the leaf's issuer name, are checked here. The rest of the chain,
// issuing certificate up to a root of the bundle, is the same for every
// certificate of one generation of key material: it is verified once per
// generation (issuingLink) and, on each call, only confirmed to be still in
// force (its root still in the bundle, now inside every certificate's
// validity). A chain with name or policy constraints is path-validated in
// full, leaf included, on every call.
func (c *CA) selfCheck(leaf *x509.Certificate, m *authority.Material, want spiffeid.ID, now, notAfter time.Time) error {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	if id != want {
		return fmt.Errorf("self-check: minted %s, want %s", id, want)
	}
	if len(leaf.URIs) != 1 {
		return fmt.Errorf("self-check: minted %d URI SANs, want 1", len(leaf.URIs))
	}
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return errors.New("self-check: minted a CA certificate")
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) || !leaf.NotAfter.Equal(notAfter.Truncate(time.Second)) {
		return fmt.Errorf("self-check: validity %s to %s does not match the window ending %s", leaf.NotBefore, leaf.NotAfter, notAfter)
	}
	bundle, err := c.cfg.Authority.GetX509BundleForTrustDomain(id.TrustDomain())
	if err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	link, err := c.issuingLink(m, bundle, now)
	if err != nil {
		return fmt.Errorf("self-check: issuing chain: %w", err)
	}
	if link.constrained {
		// Name or policy constraints in the chain apply to the leaf
		// itself: only a full path validation applies them.
		if _, _, err := x509svid.Verify(append([]*x509.Certificate{leaf}, m.Chain...), bundle, x509svid.WithTime(now)); err != nil {
			return fmt.Errorf("self-check: %w", err)
		}
		return nil
	}
	if !bytes.Equal(leaf.RawIssuer, m.Cert.RawSubject) {
		return errors.New("self-check: the minted certificate's issuer is not the issuing certificate's subject")
	}
	return nil
}

// chainLink is the issuing chain of one generation of key material, verified
// from its issuing certificate up to a root of the bundle.
type chainLink struct {
	m      *authority.Material
	anchor *x509.Certificate
	// notBefore and notAfter bound the time in which every certificate of
	// the verified chain, anchor included, is valid.
	notBefore, notAfter time.Time
	// constrained is set when a certificate of the chain carries name or
	// policy constraints, which a leaf must be checked against in full.
	constrained bool
}

// issuingLink returns m's issuing chain verified up to a root of bundle. The
// verification is done once per generation (m is replaced, never changed,
// when the authority rotates) and reused while its anchor stays in the bundle
// and now stays inside the chain's validity; otherwise it is done again.
func (c *CA) issuingLink(m *authority.Material, bundle *x509bundle.Bundle, now time.Time) (*chainLink, error) {
	if l := c.link.Load(); l != nil && l.m == m && !now.Before(l.notBefore) && !now.After(l.notAfter) && bundle.HasX509Authority(l.anchor) {
		return l, nil
	}
	if len(m.Chain) == 0 || !m.Chain[0].Equal(m.Cert) {
		return nil, errors.New("the material's chain does not start at its issuing certificate")
	}
	// What CheckSignatureFrom requires of a parent beyond the signature,
	// as crypto/x509 words it.
	if m.Cert.Version == 3 && !m.Cert.BasicConstraintsValid || m.Cert.BasicConstraintsValid && !m.Cert.IsCA {
		return nil, errors.New("the issuing certificate is not a CA")
	}
	if m.Cert.KeyUsage != 0 && m.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("the issuing certificate may not sign certificates")
	}
	roots := x509.NewCertPool()
	for _, r := range bundle.X509Authorities() {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, i := range m.Chain[1:] {
		inter.AddCert(i)
	}
	chains, err := m.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: now})
	if err != nil {
		return nil, err
	}
	chain := chains[0]
	l := &chainLink{m: m, anchor: chain[len(chain)-1]}
	for i, cert := range chain {
		if i == 0 || cert.NotBefore.After(l.notBefore) {
			l.notBefore = cert.NotBefore
		}
		if i == 0 || cert.NotAfter.Before(l.notAfter) {
			l.notAfter = cert.NotAfter
		}
		l.constrained = l.constrained || constrains(cert)
	}
	c.link.Store(l)
	return l, nil
}

// constrains reports whether a CA certificate carries constraints that
// path validation applies to the certificates below it, beyond their
// signature and validity: name constraints and policy constraints.
func constrains(cert *x509.Certificate) bool {
	return cert.PermittedDNSDomainsCritical ||
		len(cert.PermittedDNSDomains)+len(cert.ExcludedDNSDomains) > 0 ||
		len(cert.PermittedIPRanges)+len(cert.ExcludedIPRanges) > 0 ||
		len(cert.PermittedEmailAddresses)+len(cert.ExcludedEmailAddresses) > 0 ||
		len(cert.PermittedURIDomains)+len(cert.ExcludedURIDomains) > 0 ||
		len(cert.PolicyMappings) > 0 ||
		cert.RequireExplicitPolicy > 0 || cert.RequireExplicitPolicyZero ||
		cert.InhibitPolicyMapping > 0 || cert.InhibitPolicyMappingZero ||
		cert.InhibitAnyPolicy > 0 || cert.InhibitAnyPolicyZero
}

// SerialHex is the journal's spelling of a certificate's serial number.
func SerialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// newSerial is a certificate serial number of 16 bytes: the issuance time
// in nanoseconds since the epoch, big-endian, then 64 bits from the
// system's CSPRNG. 64 is exactly the least the CA/Browser Forum's Baseline
// Requirements ask (7.1): do not trim it. Serials of certificates issued
// later sort later, as numbers and as the journal's hex (SerialHex; the
// time keeps the same number of hex digits until 2262), so each issuance
// extends the journal's serial index at its end, where random serials put
// each one on a page of its own: a page written to the log per entry of a
// commit. Two certificates of one nanosecond differ in their random half.
// A serial so tells its issuance time to the nanosecond, the CA's clock
// included, where NotBefore tells the second less the backdate; serials
// are public (SECURITY.md).
func newSerial(now time.Time) (*big.Int, error) {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.UnixNano()))
	for {
		if _, err := rand.Read(b[8:]); err != nil {
			return nil, fmt.Errorf("serial: %w", err)
		}
		// Zero only at the epoch with a zero random half; serials are
		// positive.
		if n := new(big.Int).SetBytes(b[:]); n.Sign() > 0 {
			return n, nil
		}
	}
}
