package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

var (
	td     = spiffeid.RequireTrustDomainFromString("cluster.local")
	alice  = spiffeid.RequireFromPath(td, "/ns/default/sa/alice")
	bob    = spiffeid.RequireFromPath(td, "/ns/default/sa/bob")
	t0     = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	caller = ca.Caller{ID: alice, Method: "kubernetes", Subject: "system:serviceaccount:default:alice", Origin: journal.OriginKubernetes}
)

type fixture struct {
	ca    *ca.CA
	auth  *authority.Authority
	store *journal.Store
	clock *clocktesting.FakeClock
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	m, err := authority.Generate(ctx, td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, ckey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", ckey)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(dir, "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	clk := clocktesting.NewFakeClock(t0)
	auth := authority.New(td, m)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: auth, Recorder: store, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{ca: c, auth: auth, store: store, clock: clk}
}

// csrOpts shape a test CSR.
type csrOpts struct {
	key        crypto.Signer
	uris       []string
	dns        []string
	ips        []net.IP
	emails     []string
	extensions []pkix.Extension
}

func makeCSR(t testing.TB, o csrOpts) []byte {
	t.Helper()
	if o.key == nil {
		o.key = ecKey(t, elliptic.P256())
	}
	tmpl := &x509.CertificateRequest{DNSNames: o.dns, IPAddresses: o.ips, EmailAddresses: o.emails, ExtraExtensions: o.extensions}
	for _, u := range o.uris {
		parsed, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, o.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ecKey(t testing.TB, c elliptic.Curve) crypto.Signer {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func rsaKey(t testing.TB, bits int) crypto.Signer {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustExt(t testing.TB, oid asn1.ObjectIdentifier, v any) pkix.Extension {
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oid, Value: b}
}

// TestIssueRules is the table of every rule the CA applies to a request.
func TestIssueRules(t *testing.T) {
	f := newFixture(t)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	otherName := pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Value: mustSANs(t,
		asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: []byte{0x06, 0x01, 0x2a, 0xa0, 0x03, 0x0c, 0x01, 0x78}})}
	corrupt := makeCSR(t, csrOpts{})
	block, _ := pem.Decode(corrupt)
	block.Bytes[len(block.Bytes)-1] ^= 0xff
	badSig := pem.EncodeToMemory(block)

	cases := []struct {
		name   string
		caller ca.Caller
		csr    []byte
		ttl    time.Duration
		// wantReason is empty when the request must be served.
		wantReason string
		wantTTL    time.Duration
	}{
		{name: "no SANs", csr: makeCSR(t, csrOpts{}), wantTTL: time.Hour},
		{name: "exactly the caller's ID", csr: makeCSR(t, csrOpts{uris: []string{alice.String()}}), wantTTL: time.Hour},
		{name: "another SPIFFE ID", csr: makeCSR(t, csrOpts{uris: []string{bob.String()}}), wantReason: ca.ReasonCSRIdentity},
		{name: "caller's ID and another", csr: makeCSR(t, csrOpts{uris: []string{alice.String(), bob.String()}}), wantReason: ca.ReasonCSRIdentity},
		{name: "a DNS SAN", csr: makeCSR(t, csrOpts{dns: []string{"example.com"}}), wantReason: ca.ReasonCSRIdentity},
		{name: "an IP SAN", csr: makeCSR(t, csrOpts{ips: []net.IP{net.IPv4(10, 0, 0, 1)}}), wantReason: ca.ReasonCSRIdentity},
		{name: "an email SAN", csr: makeCSR(t, csrOpts{emails: []string{"a@example.com"}}), wantReason: ca.ReasonCSRIdentity},
		{name: "an otherName SAN Go does not parse", csr: makeCSR(t, csrOpts{extensions: []pkix.Extension{otherName}}), wantReason: ca.ReasonCSRIdentity},
		{name: "asks to be a CA", csr: makeCSR(t, csrOpts{extensions: []pkix.Extension{
			mustExt(t, asn1.ObjectIdentifier{2, 5, 29, 19}, struct{ IsCA bool }{true})}}), wantReason: ca.ReasonCSRCA},
		{name: "asks for cert signing", csr: makeCSR(t, csrOpts{extensions: []pkix.Extension{
			mustExt(t, asn1.ObjectIdentifier{2, 5, 29, 15}, asn1.BitString{Bytes: []byte{0x04}, BitLength: 6})}}), wantReason: ca.ReasonCSRCA},
		{name: "other extensions are ignored", csr: makeCSR(t, csrOpts{extensions: []pkix.Extension{
			mustExt(t, asn1.ObjectIdentifier{1, 2, 3, 4}, "anything")}}), wantTTL: time.Hour},
		{name: "bad signature", csr: badSig, wantReason: ca.ReasonCSRSignature},
		{name: "not PEM", csr: []byte("hello"), wantReason: ca.ReasonCSRMalformed},
		{name: "PEM of the wrong type", csr: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes}), wantReason: ca.ReasonCSRMalformed},
		{name: "two PEM blocks", csr: append(makeCSR(t, csrOpts{}), makeCSR(t, csrOpts{})...), wantReason: ca.ReasonCSRMalformed},
		{name: "larger than 16 KiB", csr: append(makeCSR(t, csrOpts{}), make([]byte, ca.MaxCSRSize)...), wantReason: ca.ReasonCSRTooLarge},
		{name: "P-384", csr: makeCSR(t, csrOpts{key: ecKey(t, elliptic.P384())}), wantTTL: time.Hour},
		{name: "P-224 refused", csr: makeCSR(t, csrOpts{key: ecKey(t, elliptic.P224())}), wantReason: ca.ReasonCSRKey},
		{name: "P-521 refused", csr: makeCSR(t, csrOpts{key: ecKey(t, elliptic.P521())}), wantReason: ca.ReasonCSRKey},
		{name: "RSA 2048", csr: makeCSR(t, csrOpts{key: rsaKey(t, 2048)}), wantTTL: time.Hour},
		{name: "RSA 1024 refused", csr: makeCSR(t, csrOpts{key: rsaKey(t, 1024)}), wantReason: ca.ReasonCSRKey},
		{name: "Ed25519", csr: makeCSR(t, csrOpts{key: edKey}), wantTTL: time.Hour},
		{name: "TTL below minimum is raised", csr: makeCSR(t, csrOpts{}), ttl: time.Minute, wantTTL: 5 * time.Minute},
		{name: "TTL above maximum is lowered", csr: makeCSR(t, csrOpts{}), ttl: 72 * time.Hour, wantTTL: 24 * time.Hour},
		{name: "TTL within bounds is kept", csr: makeCSR(t, csrOpts{}), ttl: 2 * time.Hour, wantTTL: 2 * time.Hour},
		{name: "caller outside the trust domain", caller: ca.Caller{ID: spiffeid.RequireFromString("spiffe://other.org/ns/a/sa/b")},
			csr: makeCSR(t, csrOpts{}), wantReason: ca.ReasonTrustDomain},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.caller
			if c.ID.IsZero() {
				c = caller
			}
			got, err := f.ca.Issue(context.Background(), c, tc.csr, tc.ttl)
			if tc.wantReason != "" {
				r, ok := ca.AsRefusal(err)
				if !ok {
					t.Fatalf("Issue() = %v, %v; want refusal %q", got, err, tc.wantReason)
				}
				if r.Reason != tc.wantReason {
					t.Fatalf("refusal reason = %q (%v), want %q", r.Reason, r.Err, tc.wantReason)
				}
				return
			}
			if err != nil {
				t.Fatalf("Issue() error = %v", err)
			}
			checkIssued(t, f, got, alice)
			if life := got.Leaf.NotAfter.Sub(t0); life != tc.wantTTL {
				t.Errorf("lifetime from now = %s, want %s", life, tc.wantTTL)
			}
		})
	}
}

func mustSANs(t testing.TB, names ...asn1.RawValue) []byte {
	b, err := asn1.Marshal(names)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkIssued verifies a certificate as a relying party would and checks the
// properties every issued certificate must have.
func checkIssued(t testing.TB, f *fixture, got *ca.Issued, want spiffeid.ID) {
	t.Helper()
	id, _, err := x509svid.Verify(append([]*x509.Certificate{got.Leaf}, got.Chain...), f.auth, x509svid.WithTime(f.clock.Now()))
	if err != nil {
		t.Fatalf("issued certificate does not verify: %v", err)
	}
	if id != want {
		t.Fatalf("issued identity = %s, want %s", id, want)
	}
	l := got.Leaf
	if l.IsCA || len(l.URIs) != 1 || len(l.DNSNames)+len(l.IPAddresses)+len(l.EmailAddresses) != 0 {
		t.Fatalf("issued certificate has CA=%v URIs=%v DNS=%v IPs=%v emails=%v", l.IsCA, l.URIs, l.DNSNames, l.IPAddresses, l.EmailAddresses)
	}
	if len(l.ExtKeyUsage) != 2 || l.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || l.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("extended key usage = %v, want serverAuth and clientAuth", l.ExtKeyUsage)
	}
	rec, err := f.store.LookupIssuance(context.Background(), ca.SerialHex(l))
	if err != nil {
		t.Fatalf("issued certificate is not recorded: %v", err)
	}
	if rec.SPIFFEID != want.String() || !rec.NotAfter.Equal(l.NotAfter) {
		t.Fatalf("record = %+v, does not match the certificate", rec)
	}
	chain := got.PEMChain()
	if len(chain) != 3 {
		t.Fatalf("PEM chain has %d elements, want leaf, intermediate and root", len(chain))
	}
	checkPEMChain(t, got, append(append([]*x509.Certificate{got.Leaf}, got.Chain...), got.Anchor))
}

// checkPEMChain checks that got's PEM chain is exactly want, each element
// as encoding/pem writes it.
func checkPEMChain(t testing.TB, got *ca.Issued, want []*x509.Certificate) {
	t.Helper()
	chain := got.PEMChain()
	if len(chain) != len(want) {
		t.Fatalf("PEM chain has %d elements, want %d", len(chain), len(want))
	}
	for i, c := range want {
		if w := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})); chain[i] != w {
			t.Fatalf("PEM chain element %d:\n%s\nwant\n%s", i, chain[i], w)
		}
	}
}

// The PEM chain a certificate is returned with is its own generation's:
// after a rotation, the new chain and root, and for an Issued whose chain
// was changed after issuance, the changed one. The intermediates and root
// are encoded once per generation, so a returned chain costs fewer
// allocations than one encoded in full.
func TestPEMChainFollowsTheGeneration(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	first, err := f.ca.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
	if err != nil {
		t.Fatal(err)
	}
	m, err := authority.Generate(ctx, td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.auth.Replace(m)
	second, err := f.ca.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
	if err != nil {
		t.Fatal(err)
	}
	if second.Anchor != m.Anchor || first.Anchor == m.Anchor {
		t.Fatal("the rotation did not change the anchor certificates are issued under")
	}
	checkPEMChain(t, second, []*x509.Certificate{second.Leaf, m.Chain[0], m.Anchor})
	checkPEMChain(t, first, append(append([]*x509.Certificate{first.Leaf}, first.Chain...), first.Anchor))

	changed := *first
	changed.Chain, changed.Anchor = m.Chain, m.Anchor
	checkPEMChain(t, &changed, []*x509.Certificate{first.Leaf, m.Chain[0], m.Anchor})

	full := &ca.Issued{Leaf: second.Leaf, Chain: second.Chain, Anchor: second.Anchor}
	checkPEMChain(t, full, []*x509.Certificate{second.Leaf, m.Chain[0], m.Anchor})
	shared, encoded := testing.AllocsPerRun(100, func() { second.PEMChain() }), testing.AllocsPerRun(100, func() { full.PEMChain() })
	if shared >= encoded {
		t.Fatalf("PEMChain of an issued certificate: %.0f allocations, of the same chain encoded in full %.0f; want fewer", shared, encoded)
	}

	// Last, as it changes the material's own chain slice, which the
	// Issued shares: a chain changed in place is encoded as it now is.
	second.Chain[0] = first.Chain[0]
	checkPEMChain(t, second, []*x509.Certificate{second.Leaf, first.Chain[0], m.Anchor})
}

// A CA that cannot record does not issue.
func TestIssueFailsClosedWhenRecordFails(t *testing.T) {
	f := newFixture(t)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: failingRecorder{}, Clock: f.clock})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
	r, ok := ca.AsRefusal(err)
	if !ok || r.Reason != ca.ReasonRecordFailed || r.Kind != ca.KindInternal || got != nil {
		t.Fatalf("Issue() = %v, %v; want an internal record-failed refusal and no certificate", got, err)
	}
	if _, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth}); err == nil {
		t.Fatal("New() without a recorder succeeded")
	}
}

type failingRecorder struct{}

func (failingRecorder) RecordIssuance(context.Context, journal.Issuance, *journal.Redemption) (int64, error) {
	return 0, errors.New("disk full")
}

func (failingRecorder) Integrity() error { return nil }

// A certificate never outlives the intermediate that signs it.
func TestIssueNeverOutlivesIssuer(t *testing.T) {
	f := newFixture(t)
	issuerEnd := f.auth.Current().Cert.NotAfter
	f.clock.SetTime(issuerEnd.Add(-10 * time.Minute))
	got, err := f.ca.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Leaf.NotAfter.Equal(issuerEnd) {
		t.Fatalf("NotAfter = %s, want the issuer's %s", got.Leaf.NotAfter, issuerEnd)
	}
}

// TestSerialsFollowIssuanceTime: a serial is the issuance time in
// nanoseconds then 64 random bits, so that the journal's serial index
// grows at its end; certificates of the same instant still differ, and
// the low halves look random (no two equal or consecutive).
func TestSerialsFollowIssuanceTime(t *testing.T) {
	f := newFixture(t)
	var earlier, last string // the largest serial of the instants before, of this one
	lows := map[uint64]bool{}
	for i := range 8 {
		if i > 0 {
			f.clock.Step(time.Duration(i) * time.Millisecond)
		}
		now := f.clock.Now()
		earlier = last
		var same []*big.Int
		for range 2 {
			got, err := f.ca.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
			if err != nil {
				t.Fatal(err)
			}
			n := got.Leaf.SerialNumber
			if n.Sign() <= 0 || n.BitLen() > 128 {
				t.Fatalf("serial %x: want a positive number of at most 128 bits", n)
			}
			if hi := new(big.Int).Rsh(n, 64); hi.Uint64() != uint64(now.UnixNano()) {
				t.Fatalf("serial %x: its high 64 bits are %x, want the issuance time %x", n, hi, now.UnixNano())
			}
			low := new(big.Int).And(n, new(big.Int).SetUint64(^uint64(0))).Uint64()
			if lows[low] || lows[low-1] || lows[low+1] {
				t.Fatalf("serial %x: its low 64 bits %x equal or follow another serial's", n, low)
			}
			lows[low] = true
			if der := len(n.Bytes()); der != 16 {
				t.Fatalf("serial %x is %d bytes, want 16", n, der)
			}
			hex := ca.SerialHex(got.Leaf)
			if hex <= earlier {
				t.Fatalf("serial %s issued at %s sorts before or with %s, issued earlier", hex, now, earlier)
			}
			last = max(last, hex)
			same = append(same, n)
		}
		if same[0].Cmp(same[1]) == 0 {
			t.Fatalf("two certificates issued at %s share serial %x", now, same[0])
		}
	}
}

func TestIssueServingCarriesNames(t *testing.T) {
	f := newFixture(t)
	id := spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh")
	got, err := f.ca.IssueServing(context.Background(), ca.ServingRequest{
		ID: id, DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)},
		PublicKey: ecKey(t, elliptic.P256()).Public(), TTL: time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := got.Leaf.VerifyHostname("127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	rec, err := f.store.LookupIssuance(context.Background(), ca.SerialHex(got.Leaf))
	if err != nil || rec.Origin != journal.OriginCA {
		t.Fatalf("serving certificate record = %+v, %v; want origin ca", rec, err)
	}
}

// FuzzIssueCSR feeds arbitrary CSR bytes to the CA. Whatever it is given, it
// never issues a certificate naming anyone but the authenticated caller, and
// never a CA certificate.
func FuzzIssueCSR(f *testing.F) {
	fx := newFixture(f)
	f.Add(makeCSR(f, csrOpts{}))
	f.Add(makeCSR(f, csrOpts{uris: []string{alice.String()}}))
	f.Add(makeCSR(f, csrOpts{uris: []string{bob.String()}}))
	f.Add(makeCSR(f, csrOpts{dns: []string{"x"}}))
	f.Add(makeCSR(f, csrOpts{extensions: []pkix.Extension{mustExt(f, asn1.ObjectIdentifier{2, 5, 29, 19}, struct{ IsCA bool }{true})}}))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, csr []byte) {
		got, err := fx.ca.Issue(context.Background(), caller, csr, 0)
		if err != nil {
			if got != nil {
				t.Fatal("refused, yet returned a certificate")
			}
			if _, ok := ca.AsRefusal(err); !ok {
				t.Fatalf("error is not a refusal: %v", err)
			}
			return
		}
		l := got.Leaf
		if l.IsCA || l.KeyUsage&x509.KeyUsageCertSign != 0 {
			t.Fatal("issued a CA certificate")
		}
		if len(l.URIs) != 1 || l.URIs[0].String() != alice.String() || len(l.DNSNames)+len(l.IPAddresses)+len(l.EmailAddresses) != 0 {
			t.Fatalf("issued identity %v %v %v, want only %s", l.URIs, l.DNSNames, l.IPAddresses, alice)
		}
		if id, err := x509svid.IDFromCert(l); err != nil || id != alice {
			t.Fatalf("issued %v (%v), want %s", id, err, alice)
		}
	})
}

// BenchmarkIssue measures in-process issuance: CSR parsing and verification,
// signing, the self-check, and the durable record.
func BenchmarkIssue(b *testing.B) {
	f := newFixture(b)
	csr := makeCSR(b, csrOpts{uris: []string{alice.String()}})
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := f.ca.Issue(ctx, caller, csr, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIssueConcurrent runs c callers at once, each making a fresh key
// and CSR per call as a workload would (and as the signing-floor peer in
// bench/ca.sh does), and reports issuances per second.
func BenchmarkIssueConcurrent(b *testing.B) {
	for _, c := range []int{1, 16} {
		b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) {
			issueConcurrent(b, newFixture(b).ca, c)
		})
	}
}

// BenchmarkIssueJournalOff is BenchmarkIssueConcurrent at c=16 with the
// journal off (nopRecorder, which exists only in tests): beside it, it shows
// what the durable journal takes of the in-process rate, the one part of the
// issuance the signing floor does not do. The product cannot turn it off.
func BenchmarkIssueJournalOff(b *testing.B) {
	b.Run("c=16", func(b *testing.B) {
		f := newFixture(b)
		c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: nopRecorder{}, Clock: f.clock})
		if err != nil {
			b.Fatal(err)
		}
		issueConcurrent(b, c, 16)
	})
}

func issueConcurrent(b *testing.B, c *ca.CA, callers int) {
	ctx := context.Background()
	var next atomic.Int64
	var wg sync.WaitGroup
	idle0 := idleCPU()
	start := time.Now()
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				csr := makeCSR(b, csrOpts{key: ecKey(b, elliptic.P256())})
				if _, err := c.Issue(ctx, caller, csr, 0); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "issues/s")
	// The share of the process's GOMAXPROCS × wall time no goroutine could
	// use: callers waiting for the journal's durable commit rather than for
	// a CPU.
	b.ReportMetric((idleCPU()-idle0)/(elapsed.Seconds()*float64(runtime.GOMAXPROCS(0))), "idle-frac")
}

// idleCPU is the runtime's estimate of the CPU seconds its Ps have sat idle,
// after a GC so that the estimate is current.
func idleCPU() float64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/cpu/classes/idle:cpu-seconds"}}
	metrics.Read(s)
	return s[0].Value.Float64()
}

// nopRecorder records nothing. It exists only here, to measure what the
// journal costs; the product has no way to turn the journal off.
type nopRecorder struct{}

func (nopRecorder) RecordIssuance(context.Context, journal.Issuance, *journal.Redemption) (int64, error) {
	return 0, nil
}

func (nopRecorder) Integrity() error { return nil }

// BenchmarkJournal measures issuance throughput with the durable journal on
// and off, at 1, 16 and 256 concurrent callers. CSRs are made up front so
// that the figure is the CA's own cost.
func BenchmarkJournal(b *testing.B) {
	for _, c := range []int{1, 16, 256} {
		for _, on := range []bool{true, false} {
			name := fmt.Sprintf("c=%d/journal=off", c)
			if on {
				name = fmt.Sprintf("c=%d/journal=on", c)
			}
			b.Run(name, func(b *testing.B) {
				f := newFixture(b)
				ca0 := f.ca
				if !on {
					var err error
					if ca0, err = ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: nopRecorder{}, Clock: f.clock}); err != nil {
						b.Fatal(err)
					}
				}
				csrs := make([][]byte, 64)
				for i := range csrs {
					csrs[i] = makeCSR(b, csrOpts{})
				}
				ctx := context.Background()
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for w := range c {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
							if _, err := ca0.Issue(ctx, caller, csrs[(int(i)+w)%len(csrs)], 0); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "issues/s")
			})
		}
	}
}
