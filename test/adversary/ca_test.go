package adversary

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

var (
	oidSAN              = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
)

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// rawSAN is a subjectAltName extension holding exactly names, so that name
// types Go does not model can be sent.
func rawSAN(t *testing.T, names ...asn1.RawValue) pkix.Extension {
	t.Helper()
	v, err := asn1.Marshal(names)
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oidSAN, Value: v}
}

func uriName(s string) asn1.RawValue {
	return asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(s)}
}

// TestCSRTricks: whatever a CSR asks for, the certificate names exactly the
// identity the caller proved, is never a CA, and lives at most the CA's
// maximum; malformed, oversized and unsigned CSRs are refused.
func TestCSRTricks(t *testing.T) {
	s := shared(t)
	id := td + "/ns/csr/sa/client"
	bigExt := func(n int) pkix.Extension {
		return pkix.Extension{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Value: []byte(strings.Repeat("A", n))}
	}
	bc, err := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		// csr makes the CSR; nil is an empty CSR for a P-256 key.
		csr func(t *testing.T) string
		ttl time.Duration
		// seconds, when set, is sent as the lifetime as it is.
		seconds int64
		want    codes.Code
	}{
		{name: "extra URI SAN", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, id), mustURL(t, adminID)}})
		}},
		{name: "another identity's ID", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, adminID)}})
		}},
		{name: "the ID with an upper-case scheme and host", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, "SPIFFE://CLUSTER.LOCAL/ns/kube-system/sa/admin")}})
		}},
		{name: "DNS SAN", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, id)}, DNSNames: []string{"admin.example.com"}})
		}},
		{name: "IP SAN", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, id)}, IPAddresses: []net.IP{net.ParseIP("::1")}})
		}},
		{name: "email SAN", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{EmailAddresses: []string{"root@cluster.local"}})
		}},
		{name: "registeredID SAN Go does not model", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{rawSAN(t, uriName(id),
				asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 8, Bytes: []byte{0x2a, 0x03}})}})
		}},
		{name: "CA:true", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{{Id: oidBasicConstraints, Critical: true, Value: bc}}})
		}},
		{name: "bad signature", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, newKey(t))
			if err != nil {
				t.Fatal(err)
			}
			// Flip a bit of the ECDSA signature, the last field.
			der[len(der)-3] ^= 0x01
			return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
		}},
		{name: "weak RSA key", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			k, err := rsa.GenerateKey(rand.Reader, 1024)
			if err != nil {
				t.Fatal(err)
			}
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, crypto.Signer(k))
			if err != nil {
				t.Fatal(err)
			}
			return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
		}},
		{name: "oversized CSR (32 kB)", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{bigExt(24 << 10)}})
		}},
		{name: "oversized message (1 MB)", want: codes.ResourceExhausted, csr: func(t *testing.T) string {
			return csrPEM(t, newKey(t), &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{bigExt(1 << 20)}})
		}},
		{name: "two PEM blocks", want: codes.InvalidArgument, csr: func(t *testing.T) string {
			own := csrPEM(t, newKey(t), nil)
			return own + csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: []*url.URL{mustURL(t, adminID)}})
		}},
		{name: "a ten-year lifetime is cut to the maximum", ttl: 10 * 365 * 24 * time.Hour, want: codes.OK},
		{name: "a lifetime that overflows a duration", seconds: math.MaxInt64, want: codes.OK},
		{name: "a lifetime just past what a duration holds", seconds: math.MaxInt64/int64(time.Second) + 1, want: codes.OK},
		{name: "a negative lifetime", seconds: -math.MaxInt64, want: codes.OK},
	}
	client := s.dialCA(t, nil)
	toks := s.tokens(t, id, len(cases))
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			csr := ""
			if tc.csr != nil {
				csr = tc.csr(t)
			} else {
				csr = csrPEM(t, newKey(t), nil)
			}
			ttl := tc.ttl
			if ttl == 0 {
				ttl = time.Hour
			}
			resp, err := createCertificateSeconds(client, toks[i], csr, ttl, tc.seconds)
			if got := status.Code(err); got != tc.want {
				t.Fatalf("CreateCertificate: %v, want code %s", err, tc.want)
			}
			if err != nil {
				return
			}
			chain := parseChain(t, resp)
			leaf := chain[0]
			if err := s.verifyLeaf(chain); err != nil {
				t.Fatal(err)
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
				t.Errorf("issued certificate names %v %v %v %v, want only %s", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses, id)
			}
			if leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign != 0 {
				t.Error("issued certificate can sign certificates")
			}
			if max := time.Now().Add(24*time.Hour + time.Minute); leaf.NotAfter.After(max) {
				t.Errorf("issued certificate lives until %s, past the 24h maximum", leaf.NotAfter)
			}
			if !leaf.NotAfter.After(time.Now()) || leaf.NotAfter.Before(leaf.NotBefore) {
				t.Errorf("issued certificate is valid from %s to %s", leaf.NotBefore, leaf.NotAfter)
			}
		})
	}
}

// TestJoinTokenRace: one join token presented by many enrolments at once
// is spent by exactly one of them.
func TestJoinTokenRace(t *testing.T) {
	s := shared(t)
	const n = 16
	tok := s.token(t, td+"/ns/race/sa/once")
	// Each racer has its own connection, as separate machines would.
	clients := make([]func() error, n)
	for i := range clients {
		c := s.dialCA(t, nil)
		csr := csrPEM(t, newKey(t), nil)
		clients[i] = func() error { _, err := createCertificate(c, tok, csr, time.Hour); return err }
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	startGate := make(chan struct{})
	for i, call := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startGate
			errs[i] = call()
		}()
	}
	close(startGate)
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch status.Code(err) {
		case codes.OK:
			ok++
		case codes.Unauthenticated:
		default:
			t.Errorf("a racing enrolment: %v, want OK or Unauthenticated", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent enrolments with one token succeeded, want exactly 1", ok, n)
	}
}

// foreignCA is a CA of the attacker's own; subject and keyID, when set,
// copy those of a real intermediate.
type foreignCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func newForeignCA(t *testing.T, mimic *x509.Certificate) *foreignCA {
	t.Helper()
	k := newKey(t)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "evil"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	if mimic != nil {
		tmpl.Subject, tmpl.SubjectKeyId, tmpl.SerialNumber = mimic.Subject, mimic.SubjectKeyId, mimic.SerialNumber
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &foreignCA{key: k, cert: c}
}

// issue makes a workload certificate for id under the foreign CA.
func (f *foreignCA) issue(t *testing.T, id string) *workload {
	t.Helper()
	w := &workload{id: id, key: newKey(t)}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{mustURL(t, id)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), AuthorityKeyId: f.cert.SubjectKeyId}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.cert, w.key.Public(), f.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	w.chain = []*x509.Certificate{leaf}
	return w
}

// TestRenewalWithForeignChain: a certificate from a CA of the attacker's
// own, naming an enrolled identity, renews nothing, whatever chain it is
// sent with; nor does it open the xDS or ext_authz ports.
func TestRenewalWithForeignChain(t *testing.T) {
	s := shared(t)
	id := td + "/ns/renew/sa/victim"
	real := s.enrol(t, id)
	if len(real.chain) < 2 {
		t.Fatal("the CA returned no intermediate")
	}
	plain := newForeignCA(t, nil)
	mimic := newForeignCA(t, real.chain[1])
	selfSigned := func() *workload {
		w := &workload{id: id, key: newKey(t)}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(9), URIs: []*url.URL{mustURL(t, id)}, KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, w.key.Public(), w.key)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		w.chain = []*x509.Certificate{c}
		return w
	}()
	withChain := func(w *workload, extra ...*x509.Certificate) *workload {
		w.chain = append(w.chain, extra...)
		return w
	}
	cases := []struct {
		name string
		w    *workload
	}{
		{"self-signed leaf", selfSigned},
		{"leaf and its own CA", withChain(plain.issue(t, id), plain.cert)},
		{"leaf under a CA copying the real intermediate's name and key id, sent with the real chain",
			withChain(mimic.issue(t, id), real.chain[1:]...)},
		{"the mimic CA in place of the intermediate, with the real root",
			withChain(mimic.issue(t, id), append([]*x509.Certificate{mimic.cert}, real.chain[2:]...)...)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := createCertificate(s.dialCA(t, tc.w), "", csrPEM(t, tc.w.key, nil), time.Hour)
			if got := status.Code(err); got != codes.Unauthenticated {
				t.Errorf("renewal: %v, want Unauthenticated", err)
			}
			if got := adsCode(t, s, tc.w, sidecarNode("web-0", "shop", "web")); got != codes.Unauthenticated && got != codes.Unavailable {
				t.Errorf("ADS stream: %s, want Unauthenticated (or the handshake refused)", got)
			}
		})
	}
	// The real certificate still renews: the refusals did not spend it.
	if _, err := createCertificate(s.dialCA(t, real), "", csrPEM(t, real.key, nil), time.Hour); err != nil {
		t.Fatalf("the real workload's renewal: %v", err)
	}
}

// A thief renewing a stolen identity as fast as it can, over several kept
// connections, is refused from the moment `trustmesh ca revoke`, another
// process writing the journal, returns. serve's renewals skip re-reading
// the log's size while the database's wal-index says nothing was committed
// since the last read, which concurrent renewals between two commits do;
// the revocation is a commit, so none may skip past it. The thief pauses
// while the operator revokes, as on a quiet CA: no commit of serve's own
// comes between the revocation and the next renewal to bring the
// revocation in.
func TestRevocationByAnotherProcessStopsRenewalsAtOnce(t *testing.T) {
	s := shared(t)
	id := td + "/ns/revoke/sa/stolen"
	thief := s.enrol(t, id)
	csr := csrPEM(t, thief.key, nil)
	conns := make([]pb.IstioCertificateServiceClient, 8)
	for i := range conns {
		conns[i] = s.dialCA(t, thief)
	}
	// renew has every connection renew n times at once and returns how
	// many renewals succeeded; any error but PermissionDenied fails.
	renew := func(n int) int64 {
		var ok atomic.Int64
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range n {
					_, err := createCertificate(c, "", csr, time.Hour)
					switch status.Code(err) {
					case codes.OK:
						ok.Add(1)
					case codes.PermissionDenied:
					default:
						t.Errorf("a renewal: %v, want success, or PermissionDenied once revoked", err)
						return
					}
				}
			}()
		}
		wg.Wait()
		return ok.Load()
	}
	if ok := renew(25); ok != 200 {
		t.Fatalf("%d of 200 renewals before the revocation succeeded, want all", ok)
	}
	if out, err := s.cli("ca", "revoke", "--data-dir", s.dataDir, "--spiffe-id", id); err != nil {
		t.Fatalf("trustmesh ca revoke: %v\n%s", err, out)
	}
	if ok := renew(25); ok != 0 {
		t.Fatalf("%d of 200 renewals after trustmesh ca revoke returned succeeded, want none", ok)
	}
}
