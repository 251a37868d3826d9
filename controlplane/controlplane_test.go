package controlplane_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"database/sql"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/controlplane"
)

var vmID = spiffeid.RequireFromString("spiffe://cluster.local/vm/db")

func (e *env) token(id spiffeid.ID, ttl time.Duration) string {
	e.t.Helper()
	tok, err := admin.CreateJoinToken(context.Background(), admin.DataDir(e.dataDir), e.jo, id.String(), ttl)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func TestJoinTokenWorksOnce(t *testing.T) {
	e := start(t, nil)
	tok := e.token(vmID, 10*time.Minute)
	c := newClient(t)
	e.obtain(c, tok, vmID)

	_, err := request(context.Background(), e.dial(nil, "localhost"), tok, newClient(t).csr(t, ""), time.Hour)
	wantCode(t, err, codes.Unauthenticated)
}

func TestJoinTokenExpires(t *testing.T) {
	e := start(t, nil)
	tok := e.token(vmID, 10*time.Minute)
	// The CLI made the token on the real clock, which may be ahead of the
	// test's by more than a second on a loaded machine.
	e.clock.SetTime(time.Now().Add(10*time.Minute + time.Second))
	_, err := request(context.Background(), e.dial(nil, "localhost"), tok, newClient(t).csr(t, ""), time.Hour)
	wantCode(t, err, codes.Unauthenticated)
}

// A CSR that names another identity fails and does not spend the token.
func TestJoinTokenNotSpentByRefusedCSR(t *testing.T) {
	e := start(t, nil)
	tok := e.token(vmID, 10*time.Minute)
	c := newClient(t)
	_, err := request(context.Background(), e.dial(nil, "localhost"), tok, c.csr(t, "spiffe://cluster.local/vm/other"), time.Hour)
	wantCode(t, err, codes.InvalidArgument)
	e.obtain(c, tok, vmID)
}

func TestRenewal(t *testing.T) {
	ctx := context.Background()
	e := start(t, func(c *controlplane.Config) { c.CA.MaxEnrolmentAge = 2 * time.Hour })
	c := newClient(t)
	e.obtain(c, e.token(vmID, 10*time.Minute), vmID)
	first := c.chain[0]

	t.Run("same identity", func(t *testing.T) {
		e.clock.Step(50 * time.Minute)
		e.obtain(c, "", vmID)
		if c.chain[0].SerialNumber.Cmp(first.SerialNumber) == 0 {
			t.Fatal("renewal returned the same certificate")
		}
		rec, err := e.cp.Journal().LookupIssuance(ctx, c.chain[0].SerialNumber.Text(16))
		if err != nil {
			t.Fatal(err)
		}
		if rec.Method != "x509-renewal" || rec.Caller != "x509:"+first.SerialNumber.Text(16) || rec.Origin != journal.OriginJoinToken {
			t.Fatalf("renewal recorded as %+v", rec)
		}
	})
	t.Run("another identity in the CSR", func(t *testing.T) {
		_, err := request(ctx, e.dial(c, "localhost"), "", c.csr(t, "spiffe://cluster.local/vm/other"), time.Hour)
		wantCode(t, err, codes.InvalidArgument)
	})
	t.Run("certificate from another CA", func(t *testing.T) {
		_, err := request(ctx, e.dial(foreignClient(t, vmID), "localhost"), "", newClient(t).csr(t, ""), time.Hour)
		wantCode(t, err, codes.Unauthenticated)
	})
	t.Run("expired certificate", func(t *testing.T) {
		old := &client{key: c.key, chain: c.chain}
		e.clock.Step(time.Hour + time.Minute) // past the current certificate's end
		_, err := request(ctx, e.dial(old, "localhost"), "", old.csr(t, ""), time.Hour)
		wantCode(t, err, codes.Unauthenticated)
	})
}

func TestRenewalRefusedAfterRevocation(t *testing.T) {
	e := start(t, nil)
	c := newClient(t)
	e.obtain(c, e.token(vmID, 10*time.Minute), vmID)
	rev, err := admin.Revoke(context.Background(), admin.DataDir(e.dataDir), admin.JournalOptions{}, vmID.String())
	if err != nil || rev.Enrolments != 1 {
		t.Fatalf("Revoke() = %+v, %v; want one enrolment revoked", rev, err)
	}
	_, err = request(context.Background(), e.dial(c, "localhost"), "", c.csr(t, ""), time.Hour)
	wantCode(t, err, codes.PermissionDenied)
}

// Renewals chain, but not past the enrolment's maximum age.
func TestRenewalRefusedPastEnrolmentAge(t *testing.T) {
	e := start(t, func(c *controlplane.Config) { c.CA.MaxEnrolmentAge = 2 * time.Hour })
	c := newClient(t)
	e.obtain(c, e.token(vmID, 10*time.Minute), vmID)
	e.clock.Step(50 * time.Minute)
	e.obtain(c, "", vmID)
	e.clock.Step(50 * time.Minute)
	e.obtain(c, "", vmID) // enrolled 1h40m ago
	e.clock.Step(30 * time.Minute)
	_, err := request(context.Background(), e.dial(c, "localhost"), "", c.csr(t, ""), time.Hour)
	wantCode(t, err, codes.PermissionDenied)
}

// The CA's own serving certificate verifies, but it is not a workload
// identity and can never be renewed by a client.
func TestRefusals(t *testing.T) {
	ctx := context.Background()
	e := start(t, nil)
	cases := []struct {
		name  string
		token string
		csr   string
		md    *structpb.Struct
		want  codes.Code
		// joinToken is the api/ca/v1 reason the refusal carries: only a
		// caller that presented a join token is told its state.
		joinToken string
	}{
		{name: "no credentials", want: codes.Unauthenticated},
		{name: "unknown join token", token: "tmjt.AAAA", want: codes.Unauthenticated, joinToken: cav1.JoinTokenUnknown},
		{name: "a JWT while Kubernetes is off", token: "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJpc3Rpby1jYSJ9.c2ln", want: codes.Unauthenticated},
		{name: "impersonation", token: e.token(vmID, time.Minute), md: &structpb.Struct{Fields: map[string]*structpb.Value{
			"ImpersonatedIdentity": structpb.NewStringValue("spiffe://cluster.local/ns/a/sa/b")}}, want: codes.PermissionDenied},
		{name: "malformed CSR", token: e.token(vmID, time.Minute), csr: "not a csr", want: codes.InvalidArgument},
	}
	var unauthMsgs []string
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			csr := tc.csr
			if csr == "" {
				csr = newClient(t).csr(t, "")
			}
			cctx := ctx
			if tc.token != "" {
				cctx = metadataCtx(ctx, tc.token)
			}
			_, err := e.dial(nil, "localhost").CreateCertificate(cctx, &pb.IstioCertificateRequest{Csr: csr, Metadata: tc.md})
			wantCode(t, err, tc.want)
			// A refused join token is told the token's state (api/ca/v1);
			// every other unauthenticated caller gets one message, and no
			// reason.
			if reason, _ := cav1.RefusalReason(err); reason != tc.joinToken {
				t.Errorf("refusal reason %q, want %q", reason, tc.joinToken)
			}
			if tc.want == codes.Unauthenticated && tc.joinToken == "" {
				unauthMsgs = append(unauthMsgs, status.Convert(err).Message())
			}
		})
	}
	for _, m := range unauthMsgs[1:] {
		if m != unauthMsgs[0] {
			t.Errorf("authentication failures have different messages: %q and %q", unauthMsgs[0], m)
		}
	}
	m := e.metrics()
	for _, want := range []string{
		`trustmesh_ca_refused_total{code="Unauthenticated",reason="no-credentials"} 1`,
		`trustmesh_ca_refused_total{code="PermissionDenied",reason="impersonation"} 1`,
		`trustmesh_ca_request_duration_seconds_count{outcome="refused"} 5`,
		`trustmesh_ca_certificate_expiry_timestamp_seconds{role="root"`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	// Refusals reach the journal off the request path, by shutdown at the latest.
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	store, err := journal.OpenSQLite(ctx, admin.DataDir(e.dataDir).JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	entries, err := store.Entries(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]bool{}
	for _, en := range entries {
		if en.Kind == journal.KindRefusal {
			r, _ := en.Decode()
			reasons[r.(*journal.Refusal).Reason] = true
		}
	}
	for _, want := range []string{"no-credentials", "join-token-unknown", "kubernetes-not-configured", "impersonation", "csr-malformed"} {
		if !reasons[want] {
			t.Errorf("journal has no refusal %q (has %v)", want, reasons)
		}
	}
}

func metadataCtx(ctx context.Context, token string) context.Context {
	return metadataOutgoing(ctx, "authorization", "Bearer "+token)
}

// foreignClient holds a certificate for id from a CA the control plane does
// not trust.
func foreignClient(t *testing.T, id spiffeid.ID) *client {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "evil"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	c := newClient(t)
	u, _ := url.Parse(id.String())
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, c.key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	c.chain = []*x509.Certificate{leaf}
	return c
}

// A join token written straight into the database, with no creation in the
// signed journal, is refused: database access alone mints no identity.
func TestForgedJoinTokenRowIsRefused(t *testing.T) {
	e := start(t, nil)
	db, err := sql.Open("sqlite", "file:"+admin.DataDir(e.dataDir).JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	const forged = "tmjt.forged-by-whoever-owns-the-database"
	hash := sha256.Sum256([]byte(forged))
	now := e.clock.Now()
	// The table as versions that kept one had it; none is read now.
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS join_tokens (token_hash BLOB PRIMARY KEY, token_id TEXT NOT NULL UNIQUE,
		spiffe_id TEXT NOT NULL, created_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, used_ns INTEGER, revoked_ns INTEGER)`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_ns, expires_ns) VALUES ($1, $2, $3, $4, $5)`,
		hash[:], "f0f0f0f0f0f0f0f0", "spiffe://cluster.local/ns/kube-system/sa/admin", now.UnixNano(), now.Add(time.Hour).UnixNano()); err != nil {
		t.Fatal(err)
	}
	_, err = request(context.Background(), e.dial(nil, "localhost"), forged, newClient(t).csr(t, ""), time.Hour)
	wantCode(t, err, codes.Unauthenticated)
}

// The control plane's own identity, which xDS clients pin, is never issued
// to a workload, whatever it proves.
func TestControlPlaneIdentityIsReserved(t *testing.T) {
	e := start(t, nil)
	cpID := spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh")
	_, err := request(context.Background(), e.dial(nil, "localhost"), e.token(cpID, time.Minute), newClient(t).csr(t, ""), time.Hour)
	wantCode(t, err, codes.PermissionDenied)
}
