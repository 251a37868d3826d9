package proxyconfig

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// NodeType is the first field of an Istio node id.
type NodeType string

// The node types.
const (
	Sidecar NodeType = "sidecar"
	Router  NodeType = "router"
)

// The node metadata keys trustmesh reads, as Istio's proxies send them.
const (
	MetaServiceAccount = "SERVICE_ACCOUNT"
	MetaNamespace      = "NAMESPACE"
	MetaLabels         = "LABELS"
	MetaGenerator      = "GENERATOR"
	// GeneratorGRPC marks a proxyless grpc-go client.
	GeneratorGRPC = "grpc"
)

// ErrNodeID marks a node id or metadata that does not follow Istio's form.
var ErrNodeID = errors.New("proxyconfig: malformed node")

// Node is a parsed xDS node: TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN,
// with the service account, labels and generator from its metadata.
type Node struct {
	ID             string
	Type           NodeType
	IP             string
	Pod            string
	Namespace      string
	ServiceAccount string
	Labels         map[string]string
	// Proxyless is set for GENERATOR: grpc.
	Proxyless bool
}

// ParseNode parses an xDS node the way Istio forms it.
func ParseNode(n *corev3.Node) (*Node, error) {
	if n == nil || n.GetId() == "" {
		return nil, fmt.Errorf("%w: no node id", ErrNodeID)
	}
	parts := strings.Split(n.GetId(), "~")
	if len(parts) != 4 {
		return nil, fmt.Errorf("%w: node id %q is not TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN", ErrNodeID, n.GetId())
	}
	out := &Node{ID: n.GetId(), Type: NodeType(parts[0]), IP: parts[1]}
	if out.Type != Sidecar && out.Type != Router {
		return nil, fmt.Errorf("%w: node type %q is not sidecar or router", ErrNodeID, parts[0])
	}
	if _, err := netip.ParseAddr(out.IP); err != nil {
		return nil, fmt.Errorf("%w: node IP %q: %w", ErrNodeID, out.IP, err)
	}
	ns, _, ok := strings.Cut(parts[3], ".")
	if !ok || ns == "" {
		return nil, fmt.Errorf("%w: node domain %q is not NAMESPACE.svc.DOMAIN", ErrNodeID, parts[3])
	}
	pod, ok := strings.CutSuffix(parts[2], "."+ns)
	if !ok || pod == "" {
		return nil, fmt.Errorf("%w: node name %q is not POD.%s", ErrNodeID, parts[2], ns)
	}
	out.Pod, out.Namespace = pod, ns
	md := n.GetMetadata().GetFields()
	if v := md[MetaNamespace].GetStringValue(); v != "" && v != ns {
		return nil, fmt.Errorf("%w: metadata NAMESPACE %q contradicts the node id's %q", ErrNodeID, v, ns)
	}
	out.ServiceAccount = md[MetaServiceAccount].GetStringValue()
	if out.ServiceAccount == "" {
		return nil, fmt.Errorf("%w: metadata has no %s", ErrNodeID, MetaServiceAccount)
	}
	if l := md[MetaLabels].GetStructValue(); l != nil {
		out.Labels = map[string]string{}
		for k, v := range l.GetFields() {
			out.Labels[k] = v.GetStringValue()
		}
	}
	out.Proxyless = md[MetaGenerator].GetStringValue() == GeneratorGRPC
	return out, nil
}
