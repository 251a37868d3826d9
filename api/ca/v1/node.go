package cav1

// MaxBatch is the most params one BatchNewX509SVID call may carry. A node
// with more identities to renew splits them over several calls.
const MaxBatch = 500

// Selector prefixes of Entry.selectors: the CA writes them, from the mesh
// model, and the node agent matches local callers against them. A selector
// is the prefix followed by its value.
const (
	// SelectorUID is a Unix user id, e.g. "unix:uid:1001".
	SelectorUID = "unix:uid:"
	// SelectorGID is a Unix group id, the caller's primary group.
	SelectorGID = "unix:gid:"
	// SelectorPath is the absolute path of the caller's executable.
	SelectorPath = "unix:path:"
	// SelectorSHA256 is the lower-case hex SHA-256 of the caller's
	// executable.
	SelectorSHA256 = "unix:sha256:"
	// SelectorNetns is the caller's network namespace: a name under
	// /run/netns (as `ip netns add` makes), or an absolute path to a
	// namespace file; it matches when both are the same namespace.
	SelectorNetns = "netns:"
	// SelectorPodUID is the UID of the Kubernetes pod whose cgroup the
	// caller runs in.
	SelectorPodUID = "k8s:pod-uid:"
)

// Error reasons a node is told, in a google.rpc.ErrorInfo of domain
// ErrorDomain, beside the gRPC code.
const (
	// NodeNotTrusted: the caller is not a node trusted for delegation.
	NodeNotTrusted = "NODE_NOT_TRUSTED"
	// NotOnNode: no workload of the identity asked for runs on the node.
	NotOnNode = "NOT_ON_NODE"
)
