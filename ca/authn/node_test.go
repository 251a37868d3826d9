package authn_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	nodeAID  = spiffeid.RequireFromPath(td, "/node/node-a")
	workload = spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
)

// caFixture is a CA with its journal, join tokens and the renewal
// authenticator over them.
type caFixture struct {
	clock   *clocktesting.FakeClock
	auth    *authority.Authority
	store   *journal.Store
	ca      *ca.CA
	tokens  *authn.JoinTokens
	renewal *authn.Renewal
	// journal opens the same journal again, as another replica would.
	journal journal.Config
}

// holds is a mesh model in which every node holds every identity.
type holds struct{}

func (holds) Entries(context.Context, string) ([]ca.NodeEntry, string, error) { return nil, "", nil }
func (holds) MayHold(context.Context, string, spiffeid.ID) error              { return nil }

func newCAFixture(t *testing.T) *caFixture {
	t.Helper()
	return newCAFixtureOn(t, filepath.Join(t.TempDir(), "journal.db"))
}

// newCAFixtureOn is newCAFixture with its journal at dsn.
func newCAFixtureOn(t *testing.T, dsn string) *caFixture {
	t.Helper()
	ctx := context.Background()
	now := time.Now().Truncate(time.Second)
	m, err := authority.Generate(ctx, td, now, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, vkey, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	journalCfg := journal.Config{DSN: dsn, Signer: signer, VerifierKey: vkey}
	store, err := journal.Open(ctx, journalCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	f := &caFixture{clock: clocktesting.NewFakeClock(now), auth: authority.New(td, m), store: store, journal: journalCfg}
	if f.ca, err = ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: store, Clock: f.clock, Nodes: holds{}}); err != nil {
		t.Fatal(err)
	}
	f.tokens = &authn.JoinTokens{TrustDomain: td, Store: store, Clock: f.clock}
	f.renewal = &authn.Renewal{TrustDomain: td, Bundle: f.auth, Store: store, MaxEnrolmentAge: time.Hour, Clock: f.clock}
	return f
}

func csrDER(t *testing.T) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// enrol gets a certificate for id with a join token, as `trustmesh agent`
// or a node agent off Kubernetes does.
func (f *caFixture) enrol(t *testing.T, id spiffeid.ID) []*x509.Certificate {
	t.Helper()
	ctx := context.Background()
	tok, _, err := f.tokens.Create(ctx, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caller, err := f.tokens.Authenticate(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := f.ca.Issue(ctx, caller, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER(t)}), 0)
	if err != nil {
		t.Fatal(err)
	}
	return append([]*x509.Certificate{iss.Leaf}, iss.Chain...)
}

func refusedFor(t *testing.T, err error, reason string) {
	t.Helper()
	r, ok := ca.AsRefusal(err)
	if !ok || r.Reason != reason {
		t.Fatalf("got %v; want a refusal %q", err, reason)
	}
}

// TestDelegatedCertificateCannotBeRenewed: a certificate a node obtained
// for a workload names the workload, but its key is the node's to keep; no
// client may renew with it, and so no client can turn it into its own.
func TestDelegatedCertificateCannotBeRenewed(t *testing.T) {
	f := newCAFixture(t)
	ctx := context.Background()
	node := ca.Node{Name: "node-a", ID: nodeAID, Method: authn.MethodNodeX509, Subject: "x509:1"}
	res := f.ca.IssueDelegated(ctx, node, []ca.DelegatedRequest{{ID: workload, CSR: csrDER(t)}})
	if res[0].Err != nil {
		t.Fatal(res[0].Err)
	}
	chain := append([]*x509.Certificate{res[0].Issued.Leaf}, res[0].Issued.Chain...)
	_, err := f.renewal.Authenticate(ctx, chain)
	refusedFor(t, err, ca.ReasonCertNotRenewable)
	if r, _ := ca.AsRefusal(err); r.Kind != ca.KindDenied {
		t.Fatalf("kind %s, want denied", r.Kind)
	}
	// Nor does it authenticate a node.
	na := &authn.NodeAuthenticator{TrustDomain: td, Renewal: f.renewal}
	_, err = na.Authenticate(ctx, authn.Credentials{PeerCertificates: chain})
	refusedFor(t, err, ca.ReasonCertNotRenewable)
}

// TestNodeAuthenticatorX509: a node SVID, and only a node SVID, names a node.
func TestNodeAuthenticatorX509(t *testing.T) {
	f := newCAFixture(t)
	ctx := context.Background()
	na := &authn.NodeAuthenticator{TrustDomain: td, Renewal: f.renewal}

	chain := f.enrol(t, nodeAID)
	node, err := na.Authenticate(ctx, authn.Credentials{PeerCertificates: chain})
	if err != nil {
		t.Fatal(err)
	}
	if node.Name != "node-a" || node.ID != nodeAID || node.Method != authn.MethodNodeX509 || node.Subject != "x509:"+ca.SerialHex(chain[0]) {
		t.Fatalf("node = %+v", node)
	}

	for _, tc := range []struct {
		name   string
		id     spiffeid.ID
		reason string
	}{
		{"a workload's SVID", workload, ca.ReasonNodeNotTrusted},
		{"a nested node path", spiffeid.RequireFromPath(td, "/node/node-a/web"), ca.ReasonNodeNotTrusted},
		{"a node name that is no DNS name", spiffeid.RequireFromPath(td, "/node/Node_A"), ca.ReasonNodeNotTrusted},
		{"the node prefix alone", spiffeid.RequireFromPath(td, "/node"), ca.ReasonNodeNotTrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := na.Authenticate(ctx, authn.Credentials{PeerCertificates: f.enrol(t, tc.id)})
			refusedFor(t, err, tc.reason)
		})
	}

	t.Run("a node SVID whose enrolment was revoked", func(t *testing.T) {
		id := spiffeid.RequireFromPath(td, "/node/node-r")
		chain := f.enrol(t, id)
		if _, err := f.store.Revoke(ctx, id.String(), f.clock.Now()); err != nil {
			t.Fatal(err)
		}
		_, err := na.Authenticate(ctx, authn.Credentials{PeerCertificates: chain})
		refusedFor(t, err, ca.ReasonEnrolmentRevoked)
	})
	t.Run("no credentials", func(t *testing.T) {
		_, err := na.Authenticate(ctx, authn.Credentials{})
		refusedFor(t, err, ca.ReasonNoCredentials)
	})
	t.Run("a join token", func(t *testing.T) {
		tok, _, err := f.tokens.Create(ctx, spiffeid.RequireFromPath(td, "/node/node-j"), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		_, err = na.Authenticate(ctx, authn.Credentials{BearerToken: tok})
		refusedFor(t, err, ca.ReasonNodeNotTrusted)
	})
	t.Run("a Kubernetes token off Kubernetes", func(t *testing.T) {
		_, err := na.Authenticate(ctx, authn.Credentials{BearerToken: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"})
		refusedFor(t, err, ca.ReasonKubernetesOff)
	})
}

// pods is a PodLocator over a fixed map of "ns/name" to "node uid".
type pods map[string]string

func (p pods) NodeOfPod(_ context.Context, ns, name string) (string, string, error) {
	if n, ok := p[ns+"/"+name]; ok {
		node, uid, _ := strings.Cut(n, " ")
		return node, uid, nil
	}
	return "", "", fmt.Errorf("no pod %s/%s", ns, name)
}

// jwt is a token that passes the local checks (form, audience, expiry); the
// fake apiserver's TokenReview decides the rest.
func jwt(t *testing.T, sub string) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	return enc(map[string]string{"alg": "RS256"}) + "." +
		enc(map[string]any{"aud": []string{"istio-ca"}, "sub": sub, "exp": time.Now().Add(time.Hour).Unix()}) + "." +
		base64.RawURLEncoding.EncodeToString([]byte("sig-"+sub))
}

// TestNodeAuthenticatorKubernetes: a trusted account's pod-bound token names
// the node its claims name, or the node its pod runs on; nothing else does.
func TestNodeAuthenticatorKubernetes(t *testing.T) {
	ctx := context.Background()
	// Each token's subject says what the apiserver answers for it.
	reviews := map[string]authv1.UserInfo{}
	user := func(ns, sa string, extra map[string]authv1.ExtraValue) authv1.UserInfo {
		return authv1.UserInfo{Username: "system:serviceaccount:" + ns + ":" + sa, UID: "uid-" + sa, Extra: extra}
	}
	reviews["node-claim"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"trustmesh-node-x1"}, authn.ExtraNodeName: {"node-a"}})
	reviews["pod-claim"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"trustmesh-node-x2"}, authn.ExtraPodUID: {"uid-x2"}})
	// review15-sec F3: the token of a deleted pod whose name a new pod (on
	// another node) has taken; and a pod claim without its UID.
	reviews["recreated-pod"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"trustmesh-node-x3"}, authn.ExtraPodUID: {"uid-x3-deleted"}})
	reviews["pod-claim-no-uid"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"trustmesh-node-x2"}})
	reviews["unbound"] = user("trustmesh-system", "trustmesh-node", nil)
	reviews["untrusted"] = user("demo", "web", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"web-1"}, authn.ExtraNodeName: {"node-a"}})
	reviews["unknown-pod"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraPodName: {"gone"}})
	reviews["bad-node-name"] = user("trustmesh-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraNodeName: {"Node_A"}})
	reviews["other-namespace"] = user("kube-system", "trustmesh-node", map[string]authv1.ExtraValue{
		authn.ExtraNodeName: {"node-a"}})

	client := fake.NewClientset()
	client.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview)
		var sub string
		for s := range reviews {
			if tr.Spec.Token == jwt(t, s) {
				sub = s
			}
		}
		u, ok := reviews[sub]
		if !ok {
			return true, &authv1.TokenReview{Status: authv1.TokenReviewStatus{Error: "unknown token"}}, nil
		}
		return true, &authv1.TokenReview{Status: authv1.TokenReviewStatus{Authenticated: true, User: u, Audiences: tr.Spec.Audiences}}, nil
	})
	k, err := authn.NewKubernetes(authn.KubernetesConfig{TrustDomain: td, Client: client, Clock: clocktesting.NewFakeClock(time.Now())})
	if err != nil {
		t.Fatal(err)
	}
	na := &authn.NodeAuthenticator{TrustDomain: td, Kubernetes: k, TrustedAccounts: []string{"trustmesh-system/trustmesh-node"},
		Pods: pods{"trustmesh-system/trustmesh-node-x2": "node-b uid-x2", "trustmesh-system/trustmesh-node-x3": "node-c uid-x3-new"}}

	for _, tc := range []struct{ token, node, reason string }{
		{token: "node-claim", node: "node-a"},
		{token: "pod-claim", node: "node-b"},
		{token: "recreated-pod", reason: ca.ReasonNodeNotTrusted},
		{token: "pod-claim-no-uid", reason: ca.ReasonNodeNotTrusted},
		{token: "unbound", reason: ca.ReasonNodeNotTrusted},
		{token: "untrusted", reason: ca.ReasonNodeNotTrusted},
		{token: "unknown-pod", reason: ca.ReasonNodeNotTrusted},
		{token: "bad-node-name", reason: ca.ReasonNodeNotTrusted},
		{token: "other-namespace", reason: ca.ReasonNodeNotTrusted},
		{token: "never-issued", reason: ca.ReasonTokenRejected},
	} {
		t.Run(tc.token, func(t *testing.T) {
			node, err := na.Authenticate(ctx, authn.Credentials{BearerToken: jwt(t, tc.token)})
			if tc.reason != "" {
				refusedFor(t, err, tc.reason)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := ca.Node{Name: tc.node, ID: spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh-node"),
				Method: authn.MethodNodeKubernetes, Subject: "system:serviceaccount:trustmesh-system:trustmesh-node"}
			if node != want {
				t.Fatalf("node = %+v, want %+v", node, want)
			}
			// Again, from the review cache: the claims are cached with it.
			again, err := na.Authenticate(ctx, authn.Credentials{BearerToken: jwt(t, tc.token)})
			if err != nil || again != want {
				t.Fatalf("cached: node = %+v, %v; want %+v", again, err, want)
			}
		})
	}

	t.Run("no trusted accounts trusts no node", func(t *testing.T) {
		off := &authn.NodeAuthenticator{TrustDomain: td, Kubernetes: k, Pods: na.Pods}
		_, err := off.Authenticate(ctx, authn.Credentials{BearerToken: jwt(t, "node-claim")})
		refusedFor(t, err, ca.ReasonNodeNotTrusted)
	})
	t.Run("the per-pod path still authenticates the same token as its account", func(t *testing.T) {
		c, err := k.Authenticate(ctx, jwt(t, "node-claim"))
		if err != nil || c.ID.String() != "spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh-node" {
			t.Fatalf("Authenticate = %+v, %v", c, err)
		}
	})
}

func TestNodeNameOf(t *testing.T) {
	other := spiffeid.RequireTrustDomainFromString("other.org")
	for _, tc := range []struct {
		id   spiffeid.ID
		name string
	}{
		{nodeAID, "node-a"},
		{spiffeid.RequireFromPath(td, "/node/ip-10-0-0-1.ec2.internal"), "ip-10-0-0-1.ec2.internal"},
		{spiffeid.RequireFromPath(td, "/node/a/b"), ""},
		{spiffeid.RequireFromPath(td, "/nodes/a"), ""},
		{spiffeid.RequireFromPath(td, "/ns/demo/sa/web"), ""},
		{spiffeid.RequireFromPath(other, "/node/node-a"), ""},
	} {
		got, err := authn.NodeNameOf(td, tc.id)
		if got != tc.name || (tc.name == "") != (err != nil) {
			t.Errorf("NodeNameOf(%s) = %q, %v; want %q", tc.id, got, err, tc.name)
		}
	}
}
