package controlplane_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// nodeClient dials the node service as a node agent: trusting the bundle,
// with its node SVID when it has one.
func (e *env) nodeClient(c *client) cav1.NodeServiceClient {
	e.t.Helper()
	cfg := &tls.Config{RootCAs: rootPool(e), ServerName: "localhost", Time: e.clock.Now, MinVersion: tls.VersionTLS12}
	if c != nil && c.chain != nil {
		cert := tls.Certificate{PrivateKey: c.key, Leaf: c.chain[0]}
		for _, x := range c.chain {
			cert.Certificate = append(cert.Certificate, x.Raw)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return cav1.NewNodeServiceClient(conn)
}

// nodeReason is the ErrorInfo reason of a node service error.
func nodeReason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

func wantNodeRefusal(t *testing.T, err error, code codes.Code, reason string) {
	t.Helper()
	if status.Code(err) != code || nodeReason(err) != reason {
		t.Fatalf("error = %v (reason %q), want %s %s", err, nodeReason(err), code, reason)
	}
}

// param is one BatchNewX509SVID param with a fresh key.
func param(t *testing.T, id spiffeid.ID) *cav1.NewX509SVIDParams {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return &cav1.NewX509SVIDParams{SpiffeId: id.String(), Csr: der, TtlSeconds: 3600}
}

// checkSVID verifies an issued chain as a relying party would.
func (e *env) checkSVID(r *cav1.NewX509SVIDResult, want spiffeid.ID) *x509.Certificate {
	e.t.Helper()
	if codes.Code(r.Code) != codes.OK || len(r.CertChain) < 2 {
		e.t.Fatalf("result for %s = code %d %q (%s), %d certificates", want, r.Code, r.Message, r.Reason, len(r.CertChain))
	}
	leaf, err := x509.ParseCertificate(r.CertChain[0])
	if err != nil {
		e.t.Fatal(err)
	}
	inter := x509.NewCertPool()
	for _, der := range r.CertChain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			e.t.Fatal(err)
		}
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: rootPool(e), Intermediates: inter, CurrentTime: e.clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		e.t.Fatalf("the SVID for %s does not verify: %v", want, err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != want.String() {
		e.t.Fatalf("the SVID names %v, want %s", leaf.URIs, want)
	}
	return leaf
}

// wantParamRefused checks one refused param's code and reason.
func wantParamRefused(t *testing.T, r *cav1.NewX509SVIDResult, code codes.Code, reason string) {
	t.Helper()
	if codes.Code(r.Code) != code || r.Reason != reason || len(r.CertChain) != 0 {
		t.Fatalf("result = code %s %q reason %q with %d certificates, want %s %s", codes.Code(r.Code), r.Message, r.Reason, len(r.CertChain), code, reason)
	}
}

// delegatedIssuances reads the journal's delegated issuances, by serial.
func delegatedIssuances(t *testing.T, e *env) map[string]*journal.Issuance {
	t.Helper()
	ctx := context.Background()
	store, err := journal.OpenSQLite(ctx, admin.DataDir(e.dataDir).JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	entries, err := store.Entries(ctx, 0, 10000)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*journal.Issuance{}
	for _, en := range entries {
		if en.Kind != journal.KindIssuance {
			continue
		}
		rec, err := en.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if iss := rec.(*journal.Issuance); iss.Origin == journal.OriginNode {
			out[iss.Serial] = iss
		}
	}
	return out
}

func serialHex(c *x509.Certificate) string { return strings.ToLower(c.SerialNumber.Text(16)) }

// TestNodeDelegationOnKubernetes: a node agent, authenticated by its own
// pod-bound token of a trusted account, holds the identities of the pods on
// its node and no other, over the wire, on a real kube-apiserver with Node
// objects and pods scheduled with spec.nodeName. The node comes from the
// token's node claim, or, for a token made before its pod was scheduled,
// from the pod's spec.nodeName in the mesh model.
func TestNodeDelegationOnKubernetes(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	crds, err := kubeapi.IstioCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{ErrorIfPathMissing: true, Paths: crds}); err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node-a", "node-b"} {
		if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"amb", "amb-system"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pod := func(ns, name, account, node string) *corev1.Pod {
		t.Helper()
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{ServiceAccountName: account, NodeName: node, AutomountServiceAccountToken: new(bool),
				Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	apps := &cluster{t: t, cs: cs, ns: "amb"}
	system := &cluster{t: t, cs: cs, ns: "amb-system"}
	for _, a := range []string{"web", "db", "lonely"} {
		apps.serviceAccount(a)
	}
	system.serviceAccount("node-agent")
	apps.serviceAccount("rogue")
	pod("amb", "web-0", "web", "node-a")
	pod("amb", "db-0", "db", "node-b")
	agentA := pod("amb-system", "agent-a", "node-agent", "node-a")
	agentLate := pod("amb-system", "agent-late", "node-agent", "")
	rogue := pod("amb", "rogue-0", "rogue", "node-a")
	web, db, lonely := sa("amb", "web"), sa("amb", "db"), sa("amb", "lonely")

	// The pod-bound token of a scheduled pod carries its node, as the
	// TokenReview says.
	tokA := system.token("node-agent", "istio-ca", agentA)
	review, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: tokA, Audiences: []string{"istio-ca"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := review.Status.User.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "node-a" {
		t.Fatalf("TokenReview extra node-name = %v, want [node-a] (extra %v)", got, review.Status.User.Extra)
	}
	// A token made before its pod was scheduled carries no node.
	tokLate := system.token("node-agent", "istio-ca", agentLate)
	if err := cs.CoreV1().Pods("amb-system").Bind(ctx, &corev1.Binding{ObjectMeta: metav1.ObjectMeta{Name: "agent-late"},
		Target: corev1.ObjectReference{Kind: "Node", Name: "node-b"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	review, err = cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: tokLate, Audiences: []string{"istio-ca"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := review.Status.User.Extra["authentication.kubernetes.io/node-name"]; len(got) != 0 || len(review.Status.User.Extra["authentication.kubernetes.io/pod-name"]) != 1 {
		t.Fatalf("the late token's extra = %v, want a pod name and no node name", review.Status.User.Extra)
	}

	t.Run("delegation is off by default", func(t *testing.T) {
		e := start(t, func(c *controlplane.Config) {
			c.Kubernetes.RestConfig = cfg
			c.Kubernetes.Mode = controlplane.KubernetesOn
		})
		nc := e.nodeClient(nil)
		_, err := nc.FetchEntries(metadataCtx(ctx, tokA), &cav1.FetchEntriesRequest{})
		wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
		_, err = nc.BatchNewX509SVID(metadataCtx(ctx, tokA), &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{param(t, web)}})
		wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
	})

	e := start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.CA.TrustedNodeAccounts = []string{"amb-system/node-agent"}
	})
	nc := e.nodeClient(nil)

	t.Run("the node's entries are its pods", func(t *testing.T) {
		resp, err := nc.FetchEntries(metadataCtx(ctx, tokA), &cav1.FetchEntriesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Node != "node-a" || resp.Revision == "" {
			t.Fatalf("FetchEntries = node %q revision %q, want node-a", resp.Node, resp.Revision)
		}
		got := map[string]string{}
		for _, en := range resp.Entries {
			got[en.SpiffeId] = strings.Join(en.Selectors, ",")
		}
		webPod, _ := cs.CoreV1().Pods("amb").Get(ctx, "web-0", metav1.GetOptions{})
		if got[web.String()] != cav1.SelectorPodUID+string(webPod.UID) {
			t.Fatalf("entries %v: want web attested by its pod UID %s", got, webPod.UID)
		}
		if _, ok := got[db.String()]; ok {
			t.Fatalf("entries %v name db, whose pod runs on node-b", got)
		}
		if _, ok := got[sa("amb", "rogue").String()]; !ok || len(got) != 3 {
			t.Fatalf("entries %v: want web, rogue and the agent's own pod, every pod on node-a", got)
		}
	})

	t.Run("a batch: the pod on the node issued, the others refused, the node journaled", func(t *testing.T) {
		resp, err := nc.BatchNewX509SVID(metadataCtx(ctx, tokA), &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{
			param(t, web), param(t, db), param(t, lonely), param(t, spiffeid.RequireFromSegments(nodeTD, "node", "node-b")),
		}})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Results) != 4 {
			t.Fatalf("%d results for 4 params", len(resp.Results))
		}
		leaf := e.checkSVID(resp.Results[0], web)
		wantParamRefused(t, resp.Results[1], codes.PermissionDenied, cav1.NotOnNode)
		wantParamRefused(t, resp.Results[2], codes.PermissionDenied, cav1.NotOnNode)
		if codes.Code(resp.Results[3].Code) != codes.PermissionDenied || len(resp.Results[3].CertChain) != 0 {
			t.Fatalf("a node identity was not refused: %+v", resp.Results[3])
		}
		if err := e.stop(); err != nil {
			t.Fatal(err)
		}
		iss := delegatedIssuances(t, e)
		rec := iss[serialHex(leaf)]
		if len(iss) != 1 || rec == nil || rec.Node != "node-a" || rec.SPIFFEID != web.String() || rec.Method != "node-delegated" ||
			rec.Caller != "system:serviceaccount:amb-system:node-agent" {
			t.Fatalf("journal's delegated issuances = %+v, want the web SVID by node-a's agent", iss)
		}
	})

	e = start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.CA.TrustedNodeAccounts = []string{"amb-system/node-agent"}
	})
	nc = e.nodeClient(nil)

	t.Run("a token without a node claim: its pod's node", func(t *testing.T) {
		resp, err := nc.FetchEntries(metadataCtx(ctx, tokLate), &cav1.FetchEntriesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Node != "node-b" {
			t.Fatalf("FetchEntries = node %q, want node-b, where agent-late was bound", resp.Node)
		}
		b, err := nc.BatchNewX509SVID(metadataCtx(ctx, tokLate), &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{param(t, db), param(t, web)}})
		if err != nil {
			t.Fatal(err)
		}
		e.checkSVID(b.Results[0], db)
		wantParamRefused(t, b.Results[1], codes.PermissionDenied, cav1.NotOnNode)
	})

	t.Run("an untrusted account is refused", func(t *testing.T) {
		tok := apps.token("rogue", "istio-ca", rogue)
		_, err := nc.FetchEntries(metadataCtx(ctx, tok), &cav1.FetchEntriesRequest{})
		wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
		_, err = nc.BatchNewX509SVID(metadataCtx(ctx, tok), &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{param(t, sa("amb", "rogue"))}})
		wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
	})

	t.Run("a trusted account's token bound to no pod names no node", func(t *testing.T) {
		_, err := nc.FetchEntries(metadataCtx(ctx, system.token("node-agent", "istio-ca", nil)), &cav1.FetchEntriesRequest{})
		wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
	})
}

const nodeMesh = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-a}
spec:
  workloads:
  - spiffeID: spiffe://cluster.local/ns/demo/sa/web
    selectors: {uid: 1001}
`

// TestNodeDelegationWithMeshFiles: off Kubernetes, a node agent enrolled
// with `ca token create --node` holds what its Node file lists, and nothing
// else; a node no file declares gets nothing.
func TestNodeDelegationWithMeshFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	writeMesh(t, dir, "nodes.yaml", nodeMesh)
	e := start(t, func(c *controlplane.Config) { c.XDS.MeshDir = dir })
	webID, dbID := sa("demo", "web"), sa("demo", "db")

	enrol := func(name string) *client {
		t.Helper()
		tok, err := admin.CreateNodeJoinToken(ctx, admin.DataDir(e.dataDir), e.jo, name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		c := newClient(t)
		e.obtain(c, tok, spiffeid.RequireFromSegments(nodeTD, "node", name))
		return c
	}
	a := enrol("node-a")
	nc := e.nodeClient(a)
	resp, err := nc.FetchEntries(ctx, &cav1.FetchEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Node != "node-a" || len(resp.Entries) != 1 || resp.Entries[0].SpiffeId != webID.String() ||
		strings.Join(resp.Entries[0].Selectors, ",") != cav1.SelectorUID+"1001" {
		t.Fatalf("FetchEntries = %v", resp)
	}
	b, err := nc.BatchNewX509SVID(ctx, &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{param(t, webID), param(t, dbID)}})
	if err != nil {
		t.Fatal(err)
	}
	e.checkSVID(b.Results[0], webID)
	wantParamRefused(t, b.Results[1], codes.PermissionDenied, cav1.NotOnNode)

	// A node no file declares holds nothing.
	nb := e.nodeClient(enrol("node-b"))
	_, err = nb.FetchEntries(ctx, &cav1.FetchEntriesRequest{})
	wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)
	b, err = nb.BatchNewX509SVID(ctx, &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{param(t, webID)}})
	if err != nil {
		t.Fatal(err)
	}
	wantParamRefused(t, b.Results[0], codes.PermissionDenied, cav1.NodeNotTrusted)

	// A workload's certificate is no node's: it is not trusted for
	// delegation.
	w := newClient(t)
	tok, err := admin.CreateJoinToken(ctx, admin.DataDir(e.dataDir), e.jo, webID.String(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	e.obtain(w, tok, webID)
	_, err = e.nodeClient(w).FetchEntries(ctx, &cav1.FetchEntriesRequest{})
	wantNodeRefusal(t, err, codes.PermissionDenied, cav1.NodeNotTrusted)

	// A bad node name is refused before anything is written.
	if _, err := admin.CreateNodeJoinToken(ctx, admin.DataDir(e.dataDir), e.jo, "Node_A", time.Minute); err == nil || !strings.Contains(err.Error(), "Node_A") {
		t.Fatalf("CreateNodeJoinToken(Node_A) = %v", err)
	}
}
