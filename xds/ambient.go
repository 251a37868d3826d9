package xds

import (
	"fmt"
	"maps"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"k8s.io/apimachinery/pkg/util/validation"

	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// The node proxies (`trustmesh node`, package agent/node/proxy) are
// configured by the same server, streams, caps, versions and pushes as
// the Envoys: over ADS, delta or state of the world, with the node id
// "node~<node IP>~<node name>~<DNS domain>" and their node SVID,
// spiffe://TD/node/<node name>, whose name must be the node id's. They
// are sent two types of api/ambient/v1:
//
//   - Workload: every workload in ambient or sidecar mode, which the node
//     proxy reaches over HBONE (its addresses, identity, labels, node and
//     mode), and the workloads of mode none on the proxy's own node, so
//     that it refuses their plaintext knowing why;
//   - Authorization "policies": the version of the policy snapshot in
//     force, the one ext_authz decides with. When it changes, the node
//     proxy checks its open connections again.
//
// A change to the mesh changes only the Workloads it touches (delta sends
// those alone); a change to the policies changes the Authorization alone.

// client is one connected xDS node: a workload's proxy (an Envoy, or a
// proxyless grpc-go client) or a node proxy.
type client struct {
	ID string
	// proxy is the workload's proxy, nil for a node proxy.
	proxy *proxyconfig.Node
	// ambient is the node proxy, nil for a workload's proxy.
	ambient *ambientNode
}

// ambientNode is a node proxy as its node id names it.
type ambientNode struct {
	IP     netip.Addr
	Name   string
	Domain string
}

// parseClient parses the node of a stream's first request and checks it
// against the stream's certificate: a workload's proxy must be of the
// certificate's namespace and service account, a node proxy of the
// certificate's node; neither may pass for the other.
func parseClient(ident Identity, n *corev3.Node) (*client, error) {
	if id := n.GetId(); strings.HasPrefix(id, ambientv1.NodeIDPrefix) {
		an, err := parseAmbientNode(id)
		if err != nil {
			return nil, err
		}
		switch ident.Node {
		case an.Name:
			return &client{ID: id, ambient: an}, nil
		case "":
			return nil, fmt.Errorf("%w: node proxy %s asked over workload certificate %s; a node proxy presents spiffe://%s/node/%s",
				ErrNodeMismatch, id, ident.ID, ident.ID.TrustDomain().Name(), an.Name)
		default:
			return nil, fmt.Errorf("%w: node proxy %s (node %s) asked over node %s's certificate %s",
				ErrNodeMismatch, id, an.Name, ident.Node, ident.ID)
		}
	}
	if ident.Node != "" {
		return nil, fmt.Errorf("%w: node %q is not a node proxy's id (%sIP~NAME~DOMAIN), and certificate %s names node %s, no workload",
			ErrNodeMismatch, n.GetId(), ambientv1.NodeIDPrefix, ident.ID, ident.Node)
	}
	pn, err := proxyconfig.ParseNode(n)
	if err != nil {
		return nil, err
	}
	if pn.Namespace != ident.Namespace || pn.ServiceAccount != ident.ServiceAccount {
		return nil, fmt.Errorf("%w: node %s (namespace %s, service account %s) asked over a certificate for %s",
			ErrNodeMismatch, pn.ID, pn.Namespace, pn.ServiceAccount, ident.ID)
	}
	return &client{ID: pn.ID, proxy: pn}, nil
}

// parseAmbientNode parses "node~IP~NAME~DOMAIN".
func parseAmbientNode(id string) (*ambientNode, error) {
	parts := strings.Split(id, "~")
	if len(parts) != 4 || parts[0]+"~" != ambientv1.NodeIDPrefix {
		return nil, fmt.Errorf("%w: node proxy id %q is not %sIP~NAME~DOMAIN", proxyconfig.ErrNodeID, id, ambientv1.NodeIDPrefix)
	}
	ip, err := netip.ParseAddr(parts[1])
	if err != nil {
		return nil, fmt.Errorf("%w: node proxy %q: IP %q: %w", proxyconfig.ErrNodeID, id, parts[1], err)
	}
	if msgs := validation.IsDNS1123Subdomain(parts[2]); len(msgs) > 0 {
		return nil, fmt.Errorf("%w: node proxy %q: node name %q: %s", proxyconfig.ErrNodeID, id, parts[2], strings.Join(msgs, "; "))
	}
	if parts[3] == "" {
		return nil, fmt.Errorf("%w: node proxy %q names no DNS domain", proxyconfig.ErrNodeID, id)
	}
	return &ambientNode{IP: ip, Name: parts[2], Domain: parts[3]}, nil
}

// publish returns a client's checked configuration, and for a workload's
// proxy its resources.
func (g *generation) publish(c *client) (*published, *proxyconfig.Resources, error) {
	if c.ambient != nil {
		pub, err := g.ambientSnapshot(c.ambient.Name)
		return pub, nil, err
	}
	return g.snapshot(c.proxy)
}

// ambientSet is a generation's Workload resources for node proxies: those
// every node proxy is sent, and by node the workloads of mode none on it.
type ambientSet struct {
	shared map[string]*ambientRes
	none   map[string]map[string]*ambientRes
}

type ambientRes struct {
	msg  proto.Message
	hash string
	any  *anypb.Any
}

func newAmbientRes(msg proto.Message) (*ambientRes, error) {
	hash, a, err := marshalResource(msg)
	if err != nil {
		return nil, err
	}
	return &ambientRes{msg: msg, hash: hash, any: a}, nil
}

// ambientWorkloads builds the generation's Workload resources once. A
// workload that cannot be marshaled is left out and logged: one bad
// workload does not hold back every node's configuration. g.mu is held.
func (g *generation) ambientWorkloads() *ambientSet {
	if g.ambient != nil {
		return g.ambient
	}
	set := &ambientSet{shared: map[string]*ambientRes{}, none: map[string]map[string]*ambientRes{}}
	for _, w := range g.builder.Mesh().AllWorkloads() {
		into := set.shared
		if w.Mode() == mesh.DataPlaneNone {
			if w.Node == "" {
				continue
			}
			if set.none[w.Node] == nil {
				set.none[w.Node] = map[string]*ambientRes{}
			}
			into = set.none[w.Node]
		}
		msg := WorkloadResource(w)
		r, err := newAmbientRes(msg)
		if err != nil {
			g.log.Error("a workload left out of the node proxies' configuration", "workload", w.Key(), "error", err)
			continue
		}
		into[msg.GetUid()] = r
	}
	g.ambient = set
	return set
}

// WorkloadResource is a workload as node proxies are sent it. Its name is
// its uid: the pod UID on Kubernetes, "namespace/name" off it.
func WorkloadResource(w *mesh.Workload) *ambientv1.Workload {
	uid := w.UID
	if uid == "" {
		uid = w.Key()
	}
	mode := ambientv1.DataPlaneMode_DATA_PLANE_MODE_SIDECAR
	switch w.Mode() {
	case mesh.DataPlaneAmbient:
		mode = ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT
	case mesh.DataPlaneNone:
		mode = ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE
	}
	return &ambientv1.Workload{
		Uid: uid, Name: w.Name, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount, SpiffeId: w.ID.String(),
		Node: w.Node, Addresses: append([]string(nil), w.Addresses...), Labels: maps.Clone(w.Labels), Mode: mode, Netns: w.Netns,
	}
}

// ambientSnapshot is the configuration of the node proxy of node name,
// built once per generation and node.
func (g *generation) ambientSnapshot(name string) (*published, error) {
	key := "node|" + name
	g.mu.Lock()
	defer g.mu.Unlock()
	if b, ok := g.snaps[key]; ok {
		return b.pub, b.err
	}
	set := g.ambientWorkloads()
	workloads := maps.Clone(set.shared)
	maps.Copy(workloads, set.none[name])
	auth, err := newAmbientRes(&ambientv1.Authorization{Revision: strconv.FormatUint(g.policyVersion, 10)})
	b := &built{err: err}
	if err == nil {
		b.pub = ambientPublished(map[string]map[string]*ambientRes{
			ambientv1.WorkloadType:      workloads,
			ambientv1.AuthorizationType: {ambientv1.AuthorizationName: auth},
		})
	}
	g.snaps[key] = b
	return b.pub, b.err
}

// ambientPublished assembles what a node proxy is given, with the same
// per-resource and per-type versions as an Envoy's.
func ambientPublished(byType map[string]map[string]*ambientRes) *published {
	snap := resourceSnapshot{}
	pub := &published{snap: snap, types: map[string]*typeSet{}}
	for typ, items := range byType {
		rs := &resourceSet{versions: make(map[string]string, len(items)), resources: make(map[string]types.Resource, len(items))}
		ts := &typeSet{names: make([]string, 0, len(items)), anys: make(map[string]*anypb.Any, len(items))}
		for name, r := range items {
			rs.versions[name] = r.hash
			rs.resources[name] = r.msg
			ts.names = append(ts.names, name)
			ts.anys[name] = r.any
		}
		sort.Strings(ts.names)
		ts.version = typeVersion(ts.names, rs.versions)
		rs.version = ts.version
		snap[typ] = rs
		pub.types[typ] = ts
	}
	return pub
}

// resourceSnapshot is go-control-plane's view (delta streams) of resources
// of any type, where its Snapshot holds Envoy's types only.
type resourceSnapshot map[string]*resourceSet

type resourceSet struct {
	version   string
	versions  map[string]string
	resources map[string]types.Resource
}

var _ cachev3.ResourceSnapshot = resourceSnapshot{}

func (s resourceSnapshot) GetVersion(typeURL string) string {
	if rs := s[typeURL]; rs != nil {
		return rs.version
	}
	return ""
}

func (s resourceSnapshot) GetResourcesAndTTL(typeURL string) map[string]types.ResourceWithTTL {
	rs := s[typeURL]
	if rs == nil {
		return nil
	}
	out := make(map[string]types.ResourceWithTTL, len(rs.resources))
	for name, r := range rs.resources {
		out[name] = types.ResourceWithTTL{Resource: r}
	}
	return out
}

func (s resourceSnapshot) GetResources(typeURL string) map[string]types.Resource {
	if rs := s[typeURL]; rs != nil {
		return rs.resources
	}
	return nil
}

func (s resourceSnapshot) ConstructVersionMap() error { return nil }

func (s resourceSnapshot) GetVersionMap(typeURL string) map[string]string {
	if rs := s[typeURL]; rs != nil {
		return rs.versions
	}
	return nil
}
