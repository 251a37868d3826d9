package ca

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// Delegated issuance: a node agent (ambient mode) holds the identities of the
// workloads on its node and asks the CA for their certificates, as Istio's
// ztunnel does with its trusted node accounts and SPIRE's agent with node
// attestation. The CA authorizes every identity on its own against the mesh
// model: the node must run a workload of it.

// MethodNodeDelegated is the journal's Method of a delegated issuance.
const MethodNodeDelegated = "node-delegated"

// NodePathPrefix is the path under which node identities live:
// spiffe://TD/node/NAME. No workload, and no node on a workload's behalf,
// is ever issued one through delegation; a node that authenticated with its
// Kubernetes token is issued its own, and only its own (OwnNodeID).
const NodePathPrefix = "/node/"

// MethodNodeKubernetes is ca.Node.Method for a node that authenticated with
// its Kubernetes service-account token (ca/authn).
const MethodNodeKubernetes = "node-kubernetes"

// DelegationConcurrency bounds how many params of one batch are issued at
// once. They run concurrently so that the journal commits them together.
const DelegationConcurrency = 32

// DelegatedLimit bounds the delegated params in flight in the whole CA, over
// every node and batch: each may poll the mesh model for a while
// (MayHold), and a node's many streams must not multiply that.
const DelegatedLimit = 64

// batchWait is the one window a delegated batch may wait in for a mesh
// model catching up: the first MayHold that waits opens it, and every later
// one of the batch ends with it.
type batchWait struct {
	mu       sync.Mutex
	deadline time.Time
}

type batchWaitKey struct{}

// WithBatchWait returns ctx for one delegated batch: every WaitDeadline
// under it shares one window. IssueDelegated calls it.
func WithBatchWait(ctx context.Context) context.Context {
	return context.WithValue(ctx, batchWaitKey{}, &batchWait{})
}

// WaitDeadline is when a NodeAuthorizer's bounded wait that starts at now
// and would last wait ends: now+wait, except within a delegated batch
// (IssueDelegated's ctx), whose params share the first one's deadline, so
// that a batch waits at most once, not once per param.
func WaitDeadline(ctx context.Context, now time.Time, wait time.Duration) time.Time {
	b, ok := ctx.Value(batchWaitKey{}).(*batchWait)
	if !ok {
		return now.Add(wait)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deadline.IsZero() {
		b.deadline = now.Add(wait)
	}
	return b.deadline
}

// Node is an authenticated node agent.
type Node struct {
	// Name is the node's name: "node-a".
	Name string
	// ID is what authenticated: spiffe://TD/node/NAME, or the node agent's
	// service-account identity.
	ID spiffeid.ID
	// Method is how it authenticated: "node-x509" or "node-kubernetes".
	Method string
	// Subject names the credential: "x509:<serial>" or
	// "system:serviceaccount:NS:SA".
	Subject string
}

// NodeEntry is one identity a node may hold, and the selectors a local
// caller must match to receive it (cav1.Selector* form).
type NodeEntry struct {
	ID        spiffeid.ID
	Selectors []string
}

// NodeAuthorizer is the mesh model's answer to what a node may hold; the
// control plane implements it.
type NodeAuthorizer interface {
	// Entries lists what node may hold now and a revision that changes
	// when they do.
	Entries(ctx context.Context, node string) (entries []NodeEntry, revision string, err error)
	// MayHold returns nil if node may hold id, else an error, which the CA
	// turns into a refusal ReasonNotOnNode (unless it is a *Refusal
	// already). It may wait a bounded time for a mesh model that is
	// catching up (a pod just scheduled).
	MayHold(ctx context.Context, node string, id spiffeid.ID) error
}

// DelegatedRequest asks for one certificate on a workload's behalf.
type DelegatedRequest struct {
	ID spiffeid.ID
	// CSR is a DER-encoded PKCS#10 request; it contributes only its key.
	CSR []byte
	// TTL is the lifetime asked for; zero lets the CA choose.
	TTL time.Duration
}

// DelegatedResult is the answer to one DelegatedRequest: Issued, or Err (a
// *Refusal).
type DelegatedResult struct {
	Issued *Issued
	Err    error
}

// IsNodeID reports whether id is a node identity, spiffe://TD/node/...
func IsNodeID(id spiffeid.ID) bool {
	return strings.HasPrefix(id.Path()+"/", NodePathPrefix)
}

// IssueDelegated issues a certificate per request to an authenticated node,
// each authorized on its own: one refused request does not fail the others.
// The results are in the order of reqs.
func (c *CA) IssueDelegated(ctx context.Context, node Node, reqs []DelegatedRequest) []DelegatedResult {
	out := make([]DelegatedResult, len(reqs))
	if node.Name == "" {
		for i := range out {
			out[i].Err = refuse(ReasonNodeNotTrusted, KindDenied, "no node name: the caller is not an authenticated node")
		}
		return out
	}
	ctx = WithBatchWait(ctx)
	sem := make(chan struct{}, DelegationConcurrency)
	var wg sync.WaitGroup
	for i := range reqs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			select {
			case c.delegated <- struct{}{}:
			case <-ctx.Done():
				out[i].Err = refuseErr(ReasonNodeCheckFailed, KindUnavailable, fmt.Errorf("waiting to issue %s: %w", reqs[i].ID, ctx.Err()))
				return
			}
			defer func() { <-c.delegated }()
			iss, err := c.issueDelegated(ctx, node, reqs[i])
			out[i] = DelegatedResult{Issued: iss, Err: err}
		}()
	}
	wg.Wait()
	return out
}

// Delegable returns nil if id may ever be delegated to node, whatever the
// mesh model says, else the *Refusal that every request for it gets: an
// identity of another trust domain, one reserved for the control plane, or
// a node identity other than the node's own (OwnNodeID). Both the node's
// entries (NodeEntries) and each delegated request (IssueDelegated) are
// checked with it, so that a node is never told to hold what it will
// always be refused.
func (c *CA) Delegable(node Node, id spiffeid.ID) error {
	if id.IsZero() {
		return refuse(ReasonIDMalformed, KindInvalid, "no SPIFFE ID asked for")
	}
	if id.TrustDomain() != c.cfg.TrustDomain {
		return refuse(ReasonTrustDomain, KindDenied, "identity %s is not in trust domain %s", id, c.cfg.TrustDomain)
	}
	for _, r := range c.cfg.Reserved {
		if id == r {
			return refuse(ReasonReserved, KindDenied, "%s is reserved for the control plane", r)
		}
	}
	if IsNodeID(id) {
		if own, err := c.OwnNodeID(node); err != nil || id != own {
			return refuse(ReasonNodeIdentity, KindDenied, "%s is a node identity, which is delegated only to a node authenticated by its Kubernetes token, and only its own: %s",
				id, ownOrWhyNot(own, err))
		}
	}
	return nil
}

func (c *CA) issueDelegated(ctx context.Context, node Node, req DelegatedRequest) (*Issued, error) {
	id := req.ID
	if err := c.Delegable(node, id); err != nil {
		return nil, err
	}
	if c.cfg.Nodes == nil {
		return nil, refuse(ReasonDelegationOff, KindDenied, "delegated issuance is off: the CA has no mesh model to authorize it")
	}
	if IsNodeID(id) {
		// Its own node SVID (Delegable allows no other), for the node
		// proxy's xDS and ext_authz streams on Kubernetes. Delegated, it
		// is never renewable by a client, nor accepted as a node
		// credential by the node service: the node asks again with its
		// token.
		csr, err := parseCSRDER(req.CSR, id)
		if err != nil {
			return nil, err
		}
		return c.issue(ctx, node.caller(id), workloadTemplate(id, csr.PublicKey), csr.PublicKey, c.clampTTL(req.TTL))
	}
	if err := c.cfg.Nodes.MayHold(ctx, node.Name, id); err != nil {
		if r, ok := AsRefusal(err); ok {
			return nil, r
		}
		if ctx.Err() != nil {
			return nil, refuseErr(ReasonNodeCheckFailed, KindUnavailable, fmt.Errorf("may node %s hold %s: %w", node.Name, id, err))
		}
		return nil, refuseErr(ReasonNotOnNode, KindDenied, fmt.Errorf("node %s may not hold %s: %w", node.Name, id, err))
	}
	csr, err := parseCSRDER(req.CSR, id)
	if err != nil {
		return nil, err
	}
	return c.issue(ctx, node.caller(id), workloadTemplate(id, csr.PublicKey), csr.PublicKey, c.clampTTL(req.TTL))
}

// caller is how the journal records an issuance delegated to the node.
func (n Node) caller(id spiffeid.ID) Caller {
	return Caller{
		ID:      id,
		Method:  MethodNodeDelegated,
		Subject: n.Subject,
		Origin:  journal.OriginNode,
		Node:    n.Name,
	}
}

// OwnNodeID is the node identity a node may be issued through delegation:
// spiffe://TD/node/NAME of its own name, when it authenticated with its
// Kubernetes token (a node that authenticated with its node SVID has one,
// and renews it itself). It is an error for any other node.
func (c *CA) OwnNodeID(node Node) (spiffeid.ID, error) {
	if node.Method != MethodNodeKubernetes {
		return spiffeid.ID{}, fmt.Errorf("node %s authenticated by %s, not by its Kubernetes token", node.Name, node.Method)
	}
	id, err := spiffeid.FromSegments(c.cfg.TrustDomain, strings.Trim(NodePathPrefix, "/"), node.Name)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("node name %q: %w", node.Name, err)
	}
	return id, nil
}

func ownOrWhyNot(own spiffeid.ID, err error) string {
	if err != nil {
		return err.Error()
	}
	return "this node's is " + own.String()
}

// NodeEntries lists what node may hold now, from the mesh model, without
// the identities Delegable refuses it (the control plane's own pod runs on
// some node, and the mesh lists it there): a node is not told to hold what
// it would be refused every time it asked.
func (c *CA) NodeEntries(ctx context.Context, node Node) ([]NodeEntry, string, error) {
	if c.cfg.Nodes == nil {
		return nil, "", refuse(ReasonDelegationOff, KindDenied, "delegated issuance is off: the CA has no mesh model to authorize it")
	}
	entries, rev, err := c.cfg.Nodes.Entries(ctx, node.Name)
	if err != nil {
		if r, ok := AsRefusal(err); ok {
			return nil, "", r
		}
		return nil, "", refuseErr(ReasonNodeCheckFailed, KindUnavailable, fmt.Errorf("entries of node %s: %w", node.Name, err))
	}
	// The revision stays the model's: what is left out depends only on
	// the entries and the CA's configuration.
	out := make([]NodeEntry, 0, len(entries))
	for _, e := range entries {
		if c.Delegable(node, e.ID) == nil {
			out = append(out, e)
		}
	}
	return out, rev, nil
}
