package controlplane

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/mesh"
)

// DefaultNodeWait bounds how long a node check waits for a mesh model that
// is catching up (a pod just scheduled, a Node file just edited) before it
// refuses.
const DefaultNodeWait = 2 * time.Second

// nodePoll is how often a waiting node check looks at the mesh again.
const nodePoll = 50 * time.Millisecond

// NodeModel answers, from the mesh feed, what each node's agent may hold
// (ca.NodeAuthorizer) and which node a pod runs on (authn.PodLocator).
//
// On Kubernetes a node may hold the identity of every pod scheduled on it
// (spec.nodeName) that has not finished, one entry per pod, attested by the
// pod's UID: as Istio's node_auth.go allows ztunnel an identity only while a
// pod of that service account runs on its node. Off Kubernetes, the mesh
// files' Node of that name lists what it may hold, and so does every
// ambient Workload that names the node (attested by its netns); a node
// they do not name is not trusted at all. A Node section that fails validation is
// refused and the last good one stays in force, as the xDS server keeps
// its last good mesh.
type NodeModel struct {
	// Mesh is the control plane's mesh feed.
	Mesh *mesh.Feed
	// TrustDomain checks the Node files' identities.
	TrustDomain spiffeid.TrustDomain
	// Kubernetes says the mesh is the cluster's: a node needs no
	// declaration, its pods say what it may hold.
	Kubernetes bool
	// Wait bounds a check's wait for the mesh to catch up; zero means
	// DefaultNodeWait.
	Wait  time.Duration
	Clock clock.Clock
	Log   *slog.Logger

	mu   sync.Mutex
	seen *mesh.Snapshot
	good map[string]*mesh.Node // the last valid Node section, by name
}

var (
	_ ca.NodeAuthorizer = (*NodeModel)(nil)
	_ authn.PodLocator  = (*NodeModel)(nil)
)

// nodeView is one snapshot's mesh with the Nodes in force.
type nodeView struct {
	m     *mesh.Mesh
	nodes map[string]*mesh.Node
}

// view returns the mesh in force, with the last valid Node section.
func (n *NodeModel) view() (nodeView, error) {
	snap := n.Mesh.Current()
	if snap == nil {
		return nodeView{}, mesh.ErrNoSnapshot
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if snap != n.seen {
		n.seen = snap
		if err := snap.Mesh.ValidateNodes(n.TrustDomain); err != nil {
			n.log().Error("mesh Nodes refused; the last good Nodes stay in force", "mesh_version", snap.Version, "error", err)
		} else {
			n.good = make(map[string]*mesh.Node, len(snap.Mesh.Nodes))
			for _, node := range snap.Mesh.Nodes {
				n.good[node.Name] = node
			}
		}
	}
	return nodeView{m: snap.Mesh, nodes: n.good}, nil
}

func (n *NodeModel) log() *slog.Logger {
	if n.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return n.Log
}

// untrusted is the refusal for a node the mesh files do not declare.
func untrusted(node string) error {
	return ca.Refuse(ca.KindDenied, ca.ReasonNodeNotTrusted,
		fmt.Errorf("node %s is not declared by a mesh file of kind Node, nor named by an ambient Workload", node))
}

// Entries lists what node may hold now: on Kubernetes one entry per pod on
// the node, {its SPIFFE ID, its pod UID}; off Kubernetes its Node's
// workloads. The revision is a hash of the entries.
func (n *NodeModel) Entries(ctx context.Context, node string) ([]ca.NodeEntry, string, error) {
	var v nodeView
	// Only the first snapshot is waited for: a node with no entries yet
	// is told so, and asks again.
	err := n.await(ctx, func() (bool, error) {
		var err error
		v, err = n.view()
		return err == nil, err
	})
	if err != nil {
		return nil, "", err
	}
	var entries []ca.NodeEntry
	placed := placedOn(v.m, node)
	if decl := v.nodes[node]; decl != nil {
		for _, w := range decl.Workloads {
			entries = append(entries, ca.NodeEntry{ID: w.ID, Selectors: slices.Clone(w.Selectors)})
		}
	} else if !n.Kubernetes && len(placed) == 0 {
		return nil, "", untrusted(node)
	}
	for _, w := range placed {
		entries = append(entries, ca.NodeEntry{ID: w.ID, Selectors: []string{heldBy(w)}})
	}
	slices.SortFunc(entries, func(a, b ca.NodeEntry) int {
		if c := strings.Compare(a.ID.String(), b.ID.String()); c != 0 {
			return c
		}
		return slices.Compare(a.Selectors, b.Selectors)
	})
	return entries, revision(entries), nil
}

// revision hashes the entries, which Entries sorts: equal entries, equal
// revisions.
func revision(entries []ca.NodeEntry) string {
	h := sha256.New()
	for _, e := range entries {
		fmt.Fprintf(h, "%d:%s", len(e.ID.String()), e.ID)
		for _, s := range e.Selectors {
			fmt.Fprintf(h, ",%d:%s", len(s), s)
		}
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// mayHold answers from one view.
func (n *NodeModel) mayHold(v nodeView, node string, id spiffeid.ID) (bool, error) {
	placed := placedOn(v.m, node)
	if decl := v.nodes[node]; decl != nil {
		if slices.ContainsFunc(decl.Workloads, func(w mesh.NodeWorkload) bool { return w.ID == id }) {
			return true, nil
		}
	} else if !n.Kubernetes && len(placed) == 0 {
		return false, untrusted(node)
	}
	return slices.ContainsFunc(placed, func(w *mesh.Workload) bool { return w.ID == id }), nil
}

// placedOn lists the workloads the mesh places on node that its agent may
// hold for that alone: on Kubernetes every pod scheduled there, attested by
// its UID; off it every ambient workload of the mesh files with that node
// and a netns, attested by its network namespace (its node proxy presents
// its SVID). Other file workloads naming a node give it nothing: a Node
// file says what a node may hold for them.
func placedOn(m *mesh.Mesh, node string) []*mesh.Workload {
	var out []*mesh.Workload
	for _, w := range m.WorkloadsOnNode(node) {
		if heldBy(w) != "" {
			out = append(out, w)
		}
	}
	return out
}

// heldBy is the selector by which a placed workload is attested on its
// node, "" for none.
func heldBy(w *mesh.Workload) string {
	switch {
	case w.UID != "":
		return mesh.SelectorPodUID + w.UID
	case w.Mode() == mesh.DataPlaneAmbient && w.Netns != "":
		return mesh.SelectorNetns + w.Netns
	}
	return ""
}

// MayHold returns nil if node may hold id: on Kubernetes, a pod of that
// identity runs on the node and has not finished; off Kubernetes, the
// node's Node lists it. It waits up to Wait for the mesh to say so, then
// refuses.
//
// A node the files do not declare is refused at once, not after the wait:
// it was told so by Entries, and a batch of its requests must not hold the
// CA's workers for the wait each.
func (n *NodeModel) MayHold(ctx context.Context, node string, id spiffeid.ID) error {
	err := n.await(ctx, func() (bool, error) {
		v, err := n.view()
		if err != nil {
			return false, err
		}
		return n.mayHold(v, node, id)
	})
	if _, refused := ca.AsRefusal(err); refused {
		return err
	}
	if err != nil {
		return fmt.Errorf("%s on node %s: %w", id, node, err)
	}
	return nil
}

// NodeOfPod returns the node the pod namespace/name runs on and its UID,
// waiting up to Wait for a pod the mesh does not know yet, or that is not
// scheduled.
func (n *NodeModel) NodeOfPod(ctx context.Context, namespace, name string) (node, uid string, err error) {
	err = n.await(ctx, func() (bool, error) {
		v, err := n.view()
		if err != nil {
			return false, err
		}
		if w := v.m.Workload(namespace, name); w != nil && w.Node != "" {
			node, uid = w.Node, w.UID
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		return "", "", fmt.Errorf("pod %s/%s: %w", namespace, name, err)
	}
	return node, uid, nil
}

// errNotFound is await's error when the mesh never said yes.
var errNotFound = errors.New("not in the mesh model")

// await calls check until it says yes or fails, every nodePoll for at most
// Wait. A refusal from check ends the wait.
func (n *NodeModel) await(ctx context.Context, check func() (bool, error)) error {
	c := n.Clock
	if c == nil {
		c = clock.RealClock{}
	}
	wait := n.Wait
	if wait <= 0 {
		wait = DefaultNodeWait
	}
	deadline := ca.WaitDeadline(ctx, c.Now(), wait)
	for {
		ok, err := check()
		var refusal *ca.Refusal
		switch {
		case ok:
			return nil
		case errors.As(err, &refusal):
			return err
		case !c.Now().Before(deadline):
			if err != nil {
				return err
			}
			return fmt.Errorf("%w after %s", errNotFound, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.After(nodePoll):
		}
	}
}

// checkTrustedNodeAccounts checks that each account is namespace/name of
// a Kubernetes service account, and that there is a cluster to trust them
// on.
func checkTrustedNodeAccounts(accounts []string, inKube bool) []error {
	var errs []error
	for _, a := range accounts {
		ns, sa, ok := strings.Cut(a, "/")
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(sa)) > 0 {
			errs = append(errs, setting("trusted-node-accounts", fmt.Errorf("%q is not namespace/serviceaccount", a)))
		}
	}
	if len(accounts) > 0 && !inKube {
		errs = append(errs, setting("trusted-node-accounts", errors.New("trusted node accounts are Kubernetes service accounts and need Kubernetes (--kubernetes=on, or --kubeconfig); off Kubernetes a node is trusted by a mesh file of kind Node and its node SVID (trustmesh ca token create --node NAME)")))
	}
	return errs
}
