package xds

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// PolicyLister lists AuthorizationPolicies once, as Dump reads them;
// authz/source.Dir is one.
type PolicyLister interface {
	Policies() ([]*policy.Policy, error)
}

// DumpRequest asks for one node's resources, computed as the server would
// compute them, without connecting as the node.
type DumpRequest struct {
	Mesh     mesh.Source
	Policies PolicyLister
	Proxy    proxyconfig.Config
	// NodeID is the node id, TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN,
	// or a node proxy's, node~IP~NAME~DOMAIN.
	NodeID string
	// ServiceAccount defaults to the pod's in the mesh.
	ServiceAccount string
	// Labels are put in the node's metadata (default: the pod's in the
	// mesh). As on a stream, they select nothing: gateways and policies
	// follow the labels the mesh gives the pod, and a pod the mesh does
	// not list gets no resources (proxyconfig.ErrUnknownWorkload).
	Labels map[string]string
	// Proxyless asks for a grpc-go client's resources.
	Proxyless bool
}

// ErrUnknownNode marks a dump request whose service account cannot be
// found: the pod is not in the mesh and none was given.
var ErrUnknownNode = errors.New("xds: the node's pod is not in the mesh; give its service account")

// Dump computes a node's resources and renders them as indented JSON,
// with private keys redacted and the digest of the policies they were built
// from (policy.Digest: the policy_digest that the decision log of a control
// plane enforcing the same policies records). The resources pass the same
// checks as published ones; a failing check is an error.
func Dump(req DumpRequest) ([]byte, error) {
	cfg, err := req.Proxy.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("xds: %w", err)
	}
	m, err := req.Mesh.Mesh()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMesh, err)
	}
	if err := m.Validate(cfg.TrustDomain); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMesh, err)
	}
	var ps []*policy.Policy
	if req.Policies != nil {
		if ps, err = req.Policies.Policies(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrPolicies, err)
		}
	}
	gen := newGeneration(proxyconfig.NewBuilder(cfg, m, ps), slog.New(slog.DiscardHandler))
	if strings.HasPrefix(req.NodeID, ambientv1.NodeIDPrefix) {
		return dumpAmbient(req.NodeID, policy.Digest(ps), gen)
	}
	node, err := dumpNode(req, m)
	if err != nil {
		return nil, err
	}
	pn, err := proxyconfig.ParseNode(node)
	if err != nil {
		return nil, err
	}
	res, err := gen.nodeResources(pn)
	if err != nil {
		return nil, err
	}
	return renderJSON(node.GetId(), policy.Digest(ps), res)
}

// dumpAmbient renders the Workloads a node proxy is sent. Its
// Authorization revision is a running server's policy feed version, which
// files do not have: the policy_digest names the policies instead.
func dumpAmbient(nodeID, policyDigest string, gen *generation) ([]byte, error) {
	an, err := parseAmbientNode(nodeID)
	if err != nil {
		return nil, err
	}
	pub, err := gen.ambientSnapshot(an.Name)
	if err != nil {
		return nil, err
	}
	rs := pub.snap.GetResources(ambientv1.WorkloadType)
	out := struct {
		Node         string            `json:"node"`
		PolicyDigest string            `json:"policy_digest,omitempty"`
		Workloads    []json.RawMessage `json:"workloads"`
	}{Node: nodeID, PolicyDigest: policyDigest, Workloads: []json.RawMessage{}}
	for _, name := range slices.Sorted(maps.Keys(rs)) {
		b, err := stableJSON(rs[name])
		if err != nil {
			return nil, fmt.Errorf("xds: rendering: %w", err)
		}
		out.Workloads = append(out.Workloads, b)
	}
	return indentJSON(out)
}

func dumpNode(req DumpRequest, m *mesh.Mesh) (*corev3.Node, error) {
	probe, err := proxyconfig.ParseNode(&corev3.Node{Id: req.NodeID, Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
		proxyconfig.MetaServiceAccount: structpb.NewStringValue("-"),
	}}})
	if err != nil {
		return nil, err
	}
	sa, labels := req.ServiceAccount, req.Labels
	if w := m.Workload(probe.Namespace, probe.Pod); w != nil {
		if sa == "" {
			sa = w.ServiceAccount
		}
		if labels == nil {
			labels = w.Labels
		}
	}
	if sa == "" {
		return nil, ErrUnknownNode
	}
	l := map[string]any{}
	for k, v := range labels {
		l[k] = v
	}
	md := map[string]any{proxyconfig.MetaServiceAccount: sa, proxyconfig.MetaNamespace: probe.Namespace, proxyconfig.MetaLabels: l}
	if req.Proxyless {
		md[proxyconfig.MetaGenerator] = proxyconfig.GeneratorGRPC
	}
	s, err := structpb.NewStruct(md)
	if err != nil {
		return nil, fmt.Errorf("xds: node metadata: %w", err)
	}
	return &corev3.Node{Id: req.NodeID, Metadata: s}, nil
}

// RenderJSON renders resources as stable, indented JSON (protojson output
// re-encoded, so that it is byte-stable for golden files). Private keys of
// secrets are replaced by "[redacted]".
func RenderJSON(nodeID string, res *proxyconfig.Resources) ([]byte, error) {
	return renderJSON(nodeID, "", res)
}

func renderJSON(nodeID, policyDigest string, res *proxyconfig.Resources) ([]byte, error) {
	out := struct {
		Node         string            `json:"node"`
		PolicyDigest string            `json:"policy_digest,omitempty"`
		Warnings     []string          `json:"warnings,omitempty"`
		Refusals     []string          `json:"refusals,omitempty"`
		Listeners    []json.RawMessage `json:"listeners"`
		Routes       []json.RawMessage `json:"routes"`
		Clusters     []json.RawMessage `json:"clusters"`
		Endpoints    []json.RawMessage `json:"endpoints"`
		Secrets      []json.RawMessage `json:"secrets,omitempty"`
	}{Node: nodeID, PolicyDigest: policyDigest, Warnings: res.Warnings, Refusals: res.Refusals}
	var errs []error
	add := func(dst *[]json.RawMessage, m proto.Message) {
		b, err := stableJSON(m)
		if err != nil {
			errs = append(errs, err)
			return
		}
		*dst = append(*dst, b)
	}
	for _, l := range sortedByName(res.Listeners) {
		add(&out.Listeners, l)
	}
	for _, r := range sortedByName(res.Routes) {
		add(&out.Routes, r)
	}
	for _, c := range sortedByName(res.Clusters) {
		add(&out.Clusters, c)
	}
	for _, e := range res.Endpoints {
		add(&out.Endpoints, e)
	}
	for _, s := range sortedByName(res.Secrets) {
		s = proto.Clone(s).(*tlsv3.Secret)
		if tc := s.GetTlsCertificate(); tc != nil && tc.GetPrivateKey() != nil {
			tc.PrivateKey = &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "[redacted]"}}
		}
		add(&out.Secrets, s)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("xds: rendering: %w", err)
	}
	return indentJSON(out)
}

// stableJSON is a message's protojson output re-encoded, which is
// byte-stable where protojson's is not.
func stableJSON(m proto.Message) (json.RawMessage, error) {
	b, err := protojson.Marshal(m)
	if err != nil {
		return nil, err
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

func indentJSON(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("xds: rendering: %w", err)
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		return nil, fmt.Errorf("xds: rendering: %w", err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

func sortedByName[T interface{ GetName() string }](xs []T) []T {
	out := append([]T(nil), xs...)
	sort.SliceStable(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out
}
