package engine_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	oparego "github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// benchPolicies generates n AuthorizationPolicies spread over n/10
// namespaces (at least one), each selecting its own workload, plus one
// mesh-wide DENY policy in the root namespace.
func benchPolicies(tb testing.TB, n int) []*policy.Policy {
	tb.Helper()
	var b strings.Builder
	b.WriteString(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny-debug, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/debug/*"]}}]
`)
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, `---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc%d, namespace: ns%d}
spec:
  selector: {matchLabels: {app: svc%d}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ns%d/sa/client%d", "cluster.local/ns/ingress/sa/gateway"]}}]
    to: [{operation: {methods: ["GET", "HEAD"], paths: ["/api/v1/*", "/healthz"]}}]
  - from: [{source: {namespaces: ["ns%d"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/api/v1/orders/{*}"]}}]
    when: [{key: "request.headers[x-tenant]", values: ["acme", "beta-*"]}]
`, i, i/10, i, i/10, i, i/10)
	}
	ps, err := policy.ParseYAML("bench.yaml", []byte(b.String()), "default")
	if err != nil {
		tb.Fatal(err)
	}
	return ps
}

// benchRequest targets svc0 in ns0, allowed by its policy's first rule.
func benchRequest(path string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{
			Principal: "spiffe://cluster.local/ns/ingress/sa/gateway",
			Address:   &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40000}}}},
		},
		Destination: &authv3.AttributeContext_Peer{
			Principal: "spiffe://cluster.local/ns/ns0/sa/svc0",
			Labels:    map[string]string{"app": "svc0", "version": "v1"},
			Address:   &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.2", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080}}}},
		},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "1", Method: "GET", Host: "svc0.ns0.svc.cluster.local", Path: path, Protocol: "HTTP/2",
			Headers: map[string]string{
				":authority": "svc0.ns0.svc.cluster.local", ":method": "GET", ":path": path,
				"user-agent": "bench", "x-request-id": "4f1b2c3d", "x-tenant": "acme", "accept": "*/*",
			},
		}},
	}}
}

// baselineRego decides with a generic query over the whole policy set, the
// way an opa-envoy-plugin user would: the AuthorizationPolicies are data,
// the input is the protojson CheckRequest, and Rego finds the applicable
// policies (namespace, selector) and applies DENY then ALLOW. It reuses the
// generated per-policy rule modules, so the two evaluations match the same
// rules; only the indexing and input handling differ. The path is not
// normalized (opa-envoy-plugin does not normalize either).
const baselineRego = `package baseline

import rego.v1

attrs := input.attributes

peer := trim_prefix(attrs.source.principal, "spiffe://")

peer_parts := split(peer, "/")

dest_ns := split(trim_prefix(attrs.destination.principal, "spiffe://"), "/")[2]

labels := object.get(attrs.destination, "labels", {})

http_facts := {
	"proto": "http",
	"source.principal": peer,
	"source.trustDomain": peer_parts[0],
	"source.namespace": peer_parts[2],
	"source.serviceAccount": concat("/", [peer_parts[2], peer_parts[4]]),
	"source.ip": attrs.source.address.socketAddress.address,
	"remote.ip": attrs.source.address.socketAddress.address,
	"destination.ip": attrs.destination.address.socketAddress.address,
	"destination.port": attrs.destination.address.socketAddress.portValue,
	"request.host": lower(attrs.request.http.host),
	"request.method": attrs.request.http.method,
	"request.path": split(attrs.request.http.path, "?")[0],
}

header_facts := {sprintf("request.headers[%s]", [lower(k)]): v | some k, v in attrs.request.http.headers}

facts := object.union(http_facts, header_facts)

applicable contains id if {
	some id, meta in data.meta
	meta.namespace in {data.root, dest_ns}
	every k, v in meta.selector {
		labels[k] == v
	}
}

matched contains id if {
	some id in applicable
	rules := data.trustmesh.policy[id].http with input as facts
	count(rules) > 0
}

denied if {
	some id in matched
	data.meta[id].action == "DENY"
}

allow_applies if {
	some id in applicable
	data.meta[id].action == "ALLOW"
}

default allow := false

allow if {
	not denied
	not allow_applies
}

allow if {
	not denied
	some id in matched
	data.meta[id].action == "ALLOW"
}
`

type baseline struct {
	pq oparego.PreparedEvalQuery
}

func newBaseline(tb testing.TB, set *engine.Set) *baseline {
	tb.Helper()
	modules := map[string]string{"baseline.rego": baselineRego}
	for name, src := range set.Modules() {
		modules[name] = src
	}
	meta := map[string]any{}
	for i, p := range set.Policies() {
		sel := map[string]any{}
		for k, v := range p.Selector {
			sel[k] = v
		}
		meta[fmt.Sprintf("p%d", i)] = map[string]any{"namespace": p.Namespace, "selector": sel, "action": p.Action.String()}
	}
	opts := []func(*oparego.Rego){
		oparego.Query("data.baseline.allow"),
		oparego.Store(inmem.NewFromObject(map[string]any{"meta": meta, "root": engine.DefaultRootNamespace})),
	}
	for name, src := range modules {
		opts = append(opts, oparego.Module(name, src))
	}
	pq, err := oparego.New(opts...).PrepareForEval(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return &baseline{pq: pq}
}

// check converts the request as opa-envoy-plugin does (protojson, then a
// generic map) and evaluates the generic query.
func (b *baseline) check(ctx context.Context, req *authv3.CheckRequest) (bool, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return false, err
	}
	var input map[string]any
	if err := util.UnmarshalJSON(bs, &input); err != nil {
		return false, err
	}
	rs, err := b.pq.Eval(ctx, oparego.EvalInput(input))
	if err != nil {
		return false, err
	}
	if len(rs) == 0 {
		return false, fmt.Errorf("undefined")
	}
	allowed, _ := rs[0].Expressions[0].Value.(bool)
	return allowed, nil
}

// TestBaselineAgrees checks that the benchmark compares like with like.
func TestBaselineAgrees(t *testing.T) {
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: benchPolicies(t, 100)})
	if err != nil {
		t.Fatal(err)
	}
	bl := newBaseline(t, set)
	for _, path := range []string{"/api/v1/books", "/debug/pprof", "/admin", "/healthz"} {
		req := benchRequest(path)
		d, err := set.Check(context.Background(), req)
		if err != nil {
			t.Fatal(err)
		}
		got, err := bl.check(context.Background(), req)
		if err != nil {
			t.Fatal(err)
		}
		if got != d.Allowed {
			t.Errorf("%s: baseline %v, engine %v", path, got, d.Allowed)
		}
	}
}

// BenchmarkCheck measures one decision in-process with 1, 100 and 1000
// AuthorizationPolicies, next to the opa-envoy-plugin-style baseline.
//
//	go test ./authz/engine -run '^$' -bench BenchmarkCheck -benchmem
func BenchmarkCheck(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 100, 1000} {
		set, err := engine.Build(ctx, engine.SetConfig{Policies: benchPolicies(b, n)})
		if err != nil {
			b.Fatal(err)
		}
		e := engine.New()
		e.Swap(set)
		req := benchRequest("/api/v1/books?page=2")
		b.Run(fmt.Sprintf("policies=%d/engine", n), func(b *testing.B) {
			for b.Loop() {
				d, err := e.Check(ctx, req)
				if err != nil || !d.Allowed {
					b.Fatalf("%+v %v", d, err)
				}
			}
		})
		bl := newBaseline(b, set)
		b.Run(fmt.Sprintf("policies=%d/baseline", n), func(b *testing.B) {
			for b.Loop() {
				ok, err := bl.check(ctx, req)
				if err != nil || !ok {
					b.Fatal(ok, err)
				}
			}
		})
	}
}
