package server_test

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	clocktesting "k8s.io/utils/clock/testing"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/server"
)

// TestCreateCertificateIssuesVerifiedChain: an agent with a join token gets
// a chain, leaf to root, that verifies against the bundle for exactly its
// identity and its own key, for the lifetime it asked for; then it renews
// with that certificate alone. Both are journalled and counted.
func TestCreateCertificateIssuesVerifiedChain(t *testing.T) {
	f := newFixture(t)
	client := pb.NewIstioCertificateServiceClient(f.conn(t, nil))
	key := newKey(t)
	resp, err := client.CreateCertificate(bearer(f.joinToken(t, alice)), &pb.IstioCertificateRequest{
		Csr: makeCSR(t, key, alice), ValidityDuration: int64((10 * time.Minute).Seconds()),
	})
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	chain := parseChain(t, resp.GetCertChain())
	cur := f.auth.Current()
	if len(chain) != 3 || !chain[1].Equal(cur.Cert) || !chain[2].Equal(cur.Anchor) {
		t.Fatalf("chain has %d certificates; want leaf, the issuing intermediate and its root", len(chain))
	}
	leaf := chain[0]
	id, _, err := x509svid.Verify(chain[:2], f.auth, x509svid.WithTime(f.clock.Now()))
	if err != nil || id != alice {
		t.Fatalf("chain verifies as %v, %v; want %s", id, err, alice)
	}
	if !key.Public().(*ecdsa.PublicKey).Equal(leaf.PublicKey) {
		t.Error("the leaf does not certify the CSR's key")
	}
	if want := f.clock.Now().Add(10 * time.Minute); !leaf.NotAfter.Equal(want) {
		t.Errorf("NotAfter %s, want the requested 10m: %s", leaf.NotAfter, want)
	}

	// Renew with the certificate alone, over mTLS.
	svid := &x509svid.SVID{ID: alice, Certificates: chain[:2], PrivateKey: key}
	renewer := pb.NewIstioCertificateServiceClient(f.conn(t, svid))
	resp2, err := renewer.CreateCertificate(context.Background(), &pb.IstioCertificateRequest{Csr: makeCSR(t, key)})
	if err != nil {
		t.Fatalf("renewal: %v", err)
	}
	renewed := parseChain(t, resp2.GetCertChain())[0]
	if renewed.SerialNumber.Cmp(leaf.SerialNumber) == 0 || renewed.URIs[0].String() != alice.String() {
		t.Fatalf("renewal returned serial %x for %v", renewed.SerialNumber, renewed.URIs)
	}

	var methods []string
	for _, r := range f.journalRows(t) {
		if r.Kind == "issuance" && r.SPIFFEID == alice.String() {
			methods = append(methods, r.Method+" "+r.Serial)
		}
	}
	want := []string{"join-token " + ca.SerialHex(leaf), "x509-renewal " + ca.SerialHex(renewed)}
	if fmt.Sprint(methods) != fmt.Sprint(want) {
		t.Errorf("journalled issuances %v, want %v", methods, want)
	}
	for _, m := range []string{"join-token", "x509-renewal"} {
		if v, _ := metricValue(t, f.reg, "trustmesh_ca_issued_total", map[string]string{"method": m}); v != 1 {
			t.Errorf("trustmesh_ca_issued_total{method=%q} = %v, want 1", m, v)
		}
	}
	if v, _ := metricValue(t, f.reg, "trustmesh_ca_request_duration_seconds", map[string]string{"outcome": "issued"}); v != 2 {
		t.Errorf("issued latency observations = %v, want 2", v)
	}
}

// TestCreateCertificateRefusals: every refusal a caller can provoke over the
// wire (a join token malformed, unknown, used, expired or of a revoked
// identity among them) gets the right code and reason, is journalled under an authenticated
// name only, and is counted; unauthenticated callers learn nothing from the
// message. The CSR size limit is exact.
func TestCreateCertificateRefusals(t *testing.T) {
	f := newFixture(t)
	anon := pb.NewIstioCertificateServiceClient(f.conn(t, nil))
	forged := pb.NewIstioCertificateServiceClient(f.conn(t, selfSignedSVID(t, alice)))
	spent := f.joinToken(t, alice)
	if _, err := anon.CreateCertificate(bearer(spent), &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t))}); err != nil {
		t.Fatalf("first use of a join token: %v", err)
	}
	expiring, _, err := f.tokens.Create(context.Background(), alice, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f.clock.Step(2 * time.Second)
	// A token whose identity the operator revoked after creating it (bob:
	// no other case holds a token of bob's, which the revocation would
	// revoke too).
	revoked := f.joinToken(t, bob)
	if _, err := f.store.Revoke(context.Background(), bob.String(), f.clock.Now()); err != nil {
		t.Fatal(err)
	}
	validCSR := makeCSR(t, newKey(t))
	impersonate := &structpb.Struct{Fields: map[string]*structpb.Value{"ImpersonatedIdentity": structpb.NewStringValue(bob.String())}}

	tests := []struct {
		name   string
		client pb.IstioCertificateServiceClient
		ctx    context.Context
		req    *pb.IstioCertificateRequest
		code   codes.Code
		reason string
		method string
		caller string // recorded caller; "" means not recorded
		id     string
		wire   string // the ErrorInfo reason a refused join token is told
	}{
		{name: "no credentials", client: anon, ctx: context.Background(), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonNoCredentials, method: "none"},
		{name: "unknown join token", client: anon, ctx: bearer("tmjt.bm90LWEtdG9rZW4"), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonJoinTokenUnknown, method: "join-token", wire: cav1.JoinTokenUnknown},
		{name: "spent join token", client: anon, ctx: bearer(spent), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonJoinTokenUsed, method: "join-token", wire: cav1.JoinTokenUsed},
		{name: "expired join token", client: anon, ctx: bearer(expiring), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonJoinTokenExpired, method: "join-token", wire: cav1.JoinTokenExpired},
		{name: "join token of a revoked identity", client: anon, ctx: bearer(revoked), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonJoinTokenRevoked, method: "join-token", wire: cav1.JoinTokenRevoked},
		{name: "join token cut short", client: anon, ctx: bearer(spent[:3]), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonJoinTokenMalformed, method: "join-token", wire: cav1.JoinTokenMalformed},
		{name: "kubernetes token with kubernetes off", client: anon, ctx: bearer("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonKubernetesOff, method: "kubernetes"},
		{name: "certificate no root signed", client: forged, ctx: context.Background(), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.Unauthenticated, reason: ca.ReasonCertInvalid, method: "x509-renewal", caller: "x509:unverified"},
		{name: "impersonation", client: anon, ctx: bearer(f.joinToken(t, alice)), req: &pb.IstioCertificateRequest{Csr: validCSR, Metadata: impersonate},
			code: codes.PermissionDenied, reason: ca.ReasonImpersonation, method: "join-token", caller: "join-token:", id: alice.String()},
		{name: "the control plane's identity", client: anon, ctx: bearer(f.joinToken(t, cpID)), req: &pb.IstioCertificateRequest{Csr: validCSR},
			code: codes.PermissionDenied, reason: ca.ReasonReserved, method: "join-token", caller: "join-token:", id: cpID.String()},
		{name: "CSR names another identity", client: anon, ctx: bearer(f.joinToken(t, alice)), req: &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t), bob)},
			code: codes.InvalidArgument, reason: ca.ReasonCSRIdentity, method: "join-token", caller: "join-token:", id: alice.String()},
		{name: "CSR one byte over the limit", client: anon, ctx: bearer(f.joinToken(t, alice)), req: &pb.IstioCertificateRequest{Csr: padTo(validCSR, ca.MaxCSRSize+1)},
			code: codes.InvalidArgument, reason: ca.ReasonCSRTooLarge, method: "join-token", caller: "join-token:", id: alice.String()},
		{name: "CSR that is not PEM", client: anon, ctx: bearer(f.joinToken(t, alice)), req: &pb.IstioCertificateRequest{Csr: "hello"},
			code: codes.InvalidArgument, reason: ca.ReasonCSRMalformed, method: "join-token", caller: "join-token:", id: alice.String()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.client.CreateCertificate(tc.ctx, tc.req)
			st, _ := status.FromError(err)
			if st.Code() != tc.code {
				t.Fatalf("code %s (%v), want %s", st.Code(), err, tc.code)
			}
			wire, told := cav1.RefusalReason(err)
			if wire != tc.wire || told != (tc.wire != "") {
				t.Errorf("the caller was told reason %q (%v), want %q", wire, told, tc.wire)
			}
			// An unauthenticated caller learns nothing, except the state of
			// the join token it sent.
			if tc.code == codes.Unauthenticated && tc.wire == "" && st.Message() != "authentication failed" {
				t.Errorf("an unauthenticated caller was told %q", st.Message())
			}
			if tc.wire != "" && (!strings.HasPrefix(st.Message(), "authentication failed: the join token ") || strings.Contains(st.Message(), alice.String())) {
				t.Errorf("a refused join token was told %q", st.Message())
			}
			if v, _ := metricValue(t, f.reg, "trustmesh_ca_refused_total", map[string]string{"reason": tc.reason, "code": tc.code.String()}); v != 1 {
				t.Errorf("trustmesh_ca_refused_total{reason=%q,code=%q} = %v, want 1", tc.reason, tc.code, v)
			}
			var found bool
			for _, r := range f.journalRows(t) {
				if r.Kind != "refusal" || r.Reason != tc.reason {
					continue
				}
				found = true
				if r.Method != tc.method || !strings.HasPrefix(r.Caller, tc.caller) || (tc.caller == "") != (r.Caller == "") || r.SPIFFEID != tc.id {
					t.Errorf("journalled refusal method=%q caller=%q id=%q; want method=%q caller=%q… id=%q",
						r.Method, r.Caller, r.SPIFFEID, tc.method, tc.caller, tc.id)
				}
			}
			if !found {
				t.Errorf("no refusal with reason %q in the journal", tc.reason)
			}
		})
	}

	// At exactly the limit the CSR is read, and served.
	if _, err := anon.CreateCertificate(bearer(f.joinToken(t, alice)), &pb.IstioCertificateRequest{Csr: padTo(validCSR, ca.MaxCSRSize)}); err != nil {
		t.Errorf("a CSR of exactly MaxCSRSize bytes: %v", err)
	}
	// A refused impersonation spends no token.
	tok := f.joinToken(t, alice)
	if _, err := anon.CreateCertificate(bearer(tok), &pb.IstioCertificateRequest{Csr: validCSR, Metadata: impersonate}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("impersonation: %v", err)
	}
	if _, err := anon.CreateCertificate(bearer(tok), &pb.IstioCertificateRequest{Csr: validCSR}); err != nil {
		t.Errorf("the token refused for impersonation was spent: %v", err)
	}
}

// padTo puts text before the PEM block, which PEM parsers skip, so that the
// CSR is n bytes long and otherwise valid.
func padTo(csr string, n int) string {
	return strings.Repeat("#", n-len(csr)-1) + "\n" + csr
}

type issuerFunc func() (*ca.Issued, error)

func (f issuerFunc) Issue(context.Context, ca.Caller, []byte, time.Duration) (*ca.Issued, error) {
	return f()
}

type fixedAuthenticator struct{ caller ca.Caller }

func (a fixedAuthenticator) Authenticate(context.Context, authn.Credentials) (ca.Caller, error) {
	return a.caller, nil
}

type refusalRecord struct{ reason, method, caller, id string }

type refusalRecorder struct{ got []refusalRecord }

func (r *refusalRecorder) Record(_ time.Time, reason, method, caller, id string) {
	r.got = append(r.got, refusalRecord{reason, method, caller, id})
}

// TestRefusalCodes is the one mapping from a CA error to a gRPC status:
// each refusal kind to its code, anything else to Internal, and detail shown
// only where the caller may see it.
func TestRefusalCodes(t *testing.T) {
	detail := errors.New("the secret detail")
	tests := []struct {
		err     error
		code    codes.Code
		reason  string
		showErr bool
		msg     string // when set, the status message must contain it
	}{
		{ca.Refuse(ca.KindUnauthenticated, "r1", detail), codes.Unauthenticated, "r1", false, ""},
		{ca.Refuse(ca.KindDenied, "r2", detail), codes.PermissionDenied, "r2", false, ""},
		{ca.Refuse(ca.KindInvalid, "r3", detail), codes.InvalidArgument, "r3", true, ""},
		{ca.Refuse(ca.KindUnavailable, "r4", detail), codes.Unavailable, "r4", false, "try again"},
		{ca.Refuse(ca.KindUnavailable, ca.ReasonJournalUnavailable, detail), codes.Unavailable, ca.ReasonJournalUnavailable, false, "journal is unavailable"},
		{ca.Refuse(ca.KindUnavailable, ca.ReasonClockBehind, detail), codes.Unavailable, ca.ReasonClockBehind, false, "clock is behind"},
		{ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewFailed, detail), codes.Unavailable, ca.ReasonTokenReviewFailed, false, "TokenReview"},
		{ca.Refuse(ca.KindInternal, "r5", detail), codes.Internal, "r5", false, ""},
		{fmt.Errorf("wrapped: %w", ca.Refuse(ca.KindDenied, "r6", detail)), codes.PermissionDenied, "r6", false, ""},
		{detail, codes.Internal, "internal", false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.reason, func(t *testing.T) {
			rec := &refusalRecorder{}
			reg := prometheus.NewRegistry()
			m, err := authority.Generate(context.Background(), td, time.Now(), 0)
			if err != nil {
				t.Fatal(err)
			}
			svc := server.NewCertificateService(server.CertificateServiceConfig{
				Issuer:        issuerFunc(func() (*ca.Issued, error) { return nil, tc.err }),
				Authenticator: fixedAuthenticator{ca.Caller{ID: alice, Method: "join-token", Subject: "join-token:0011"}},
				Refusals:      rec,
				Metrics:       server.NewMetrics(reg, func() *authority.Material { return m }),
				Clock:         clocktesting.NewFakeClock(time.Now()),
			})
			_, err = svc.CreateCertificate(metadata.NewIncomingContext(context.Background(), nil), &pb.IstioCertificateRequest{Csr: "x"})
			st, _ := status.FromError(err)
			if st.Code() != tc.code {
				t.Fatalf("code %s, want %s", st.Code(), tc.code)
			}
			if strings.Contains(st.Message(), detail.Error()) != tc.showErr {
				t.Errorf("message %q; detail shown should be %v", st.Message(), tc.showErr)
			}
			if !strings.Contains(st.Message(), tc.msg) {
				t.Errorf("message %q, want it to say %q", st.Message(), tc.msg)
			}
			want := refusalRecord{tc.reason, "join-token", "join-token:0011", alice.String()}
			if len(rec.got) != 1 || rec.got[0] != want {
				t.Errorf("recorded %v, want [%v]", rec.got, want)
			}
			if v, _ := metricValue(t, reg, "trustmesh_ca_refused_total", map[string]string{"reason": tc.reason, "code": tc.code.String()}); v != 1 {
				t.Errorf("refused counter = %v, want 1", v)
			}
		})
	}
}
