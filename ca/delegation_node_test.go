package ca_test

import (
	"context"
	"crypto/x509"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestIssueDelegatedOwnNodeID: a node that authenticated with its
// Kubernetes token is issued its own node SVID through delegation (the node
// proxy's client certificate for xDS and ext_authz), recorded as delegated
// to it, without asking the mesh model; never another node's, never a
// deeper node path, and not to a node that authenticated with its node SVID
// (it has one already).
func TestIssueDelegatedOwnNodeID(t *testing.T) {
	f := newFixture(t)
	nodes := &fakeNodes{}
	c := f.delegatingCA(t, nodes)
	ctx := context.Background()
	kubeNode := ca.Node{Name: "node-a", ID: spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh-node"),
		Method: ca.MethodNodeKubernetes, Subject: "system:serviceaccount:trustmesh-system:trustmesh-node"}
	own := spiffeid.RequireFromPath(td, "/node/node-a")
	reqs := []ca.DelegatedRequest{
		{ID: own, CSR: derCSR(t, csrOpts{})},
		{ID: spiffeid.RequireFromPath(td, "/node/node-b"), CSR: derCSR(t, csrOpts{})},
		{ID: spiffeid.RequireFromPath(td, "/node/node-a/x"), CSR: derCSR(t, csrOpts{})},
		{ID: spiffeid.RequireFromPath(td, "/node"), CSR: derCSR(t, csrOpts{})},
	}
	res := c.IssueDelegated(ctx, kubeNode, reqs)
	if res[0].Err != nil {
		t.Fatalf("the node's own identity refused: %v", res[0].Err)
	}
	leaf := res[0].Issued.Leaf
	id, _, err := x509svid.Verify(append([]*x509.Certificate{leaf}, res[0].Issued.Chain...), f.auth, x509svid.WithTime(f.clock.Now()))
	if err != nil || id != own {
		t.Fatalf("issued certificate verifies as %s, %v; want %s", id, err, own)
	}
	iss, err := f.store.LookupIssuance(ctx, ca.SerialHex(leaf))
	if err != nil {
		t.Fatal(err)
	}
	if iss.Node != "node-a" || iss.Origin != journal.OriginNode || iss.Method != ca.MethodNodeDelegated || iss.Caller != kubeNode.Subject {
		t.Fatalf("journalled as %+v; want node node-a, origin node, method node-delegated, caller %s", iss, kubeNode.Subject)
	}
	for i, r := range res[1:] {
		if rf, ok := ca.AsRefusal(r.Err); !ok || rf.Reason != ca.ReasonNodeIdentity || rf.Kind != ca.KindDenied || r.Issued != nil {
			t.Errorf("%s: %v, %v; want refusal %q", reqs[i+1].ID, r.Issued, r.Err, ca.ReasonNodeIdentity)
		}
	}
	if len(nodes.asked) != 0 {
		t.Errorf("the mesh model was asked %v: node identities are not the model's", nodes.asked)
	}

	// A node that authenticated with its node SVID renews that itself.
	res = c.IssueDelegated(ctx, nodeA, []ca.DelegatedRequest{{ID: nodeA.ID, CSR: derCSR(t, csrOpts{})}})
	if rf, ok := ca.AsRefusal(res[0].Err); !ok || rf.Reason != ca.ReasonNodeIdentity {
		t.Fatalf("an x509 node asking for its own node SVID: %v, %v; want refusal %q", res[0].Issued, res[0].Err, ca.ReasonNodeIdentity)
	}
}
