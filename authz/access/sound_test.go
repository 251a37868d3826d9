package access_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
)

const root = "istio-system"

// soundMesh is a small mesh with what makes cells differ: services in two
// namespaces, a service with three workloads of one identity, two with
// the same labels, one with two identities, an HTTP port whose target port differs,
// TCP and gRPC ports, and clients that serve nothing.
func soundMesh() *mesh.Mesh {
	wl := func(ns, name, sa string, labels map[string]string) *mesh.Workload {
		return &mesh.Workload{Namespace: ns, Name: name, ServiceAccount: sa,
			ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/" + ns + "/sa/" + sa), Labels: labels}
	}
	return &mesh.Mesh{
		Services: []*mesh.Service{
			{Namespace: "web", Name: "front", Hostname: "front.web.svc.cluster.local", Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP, TargetPort: 8080}},
				Endpoints: []mesh.Endpoint{
					{Address: "10.0.0.1", Workload: wl("web", "front-0", "front", map[string]string{"app": "front"})},
					{Address: "10.0.0.2", Workload: wl("web", "front-1", "front", map[string]string{"app": "front", "version": "v2"})},
					// Like front-0 but for its address.
					{Address: "10.0.0.5", Workload: wl("web", "front-2", "front", map[string]string{"app": "front"})},
				}},
			{Namespace: "web", Name: "api", Hostname: "api.web.svc.cluster.local", Ports: []mesh.Port{{Name: "grpc", Port: 9090, Protocol: mesh.GRPC}, {Name: "admin", Port: 9091, Protocol: mesh.HTTP}},
				Endpoints: []mesh.Endpoint{
					{Address: "10.0.0.3", Workload: wl("web", "api-0", "api", map[string]string{"app": "api"})},
					{Address: "10.0.0.4", Workload: wl("web", "api-canary-0", "api-canary", map[string]string{"app": "api", "version": "v2"})},
				}},
			{Namespace: "db", Name: "store", Hostname: "store.db.svc.cluster.local", Ports: []mesh.Port{{Name: "pg", Port: 5432, Protocol: mesh.TCP}},
				Endpoints: []mesh.Endpoint{{Address: "10.0.1.1", Workload: wl("db", "store-0", "store", map[string]string{"app": "store"})}}},
		},
		Workloads: []*mesh.Workload{
			wl("web", "cron-0", "cron", map[string]string{"app": "cron"}),
			wl("other", "client-0", "client", map[string]string{"app": "client"}),
		},
	}
}

// policyGen writes random AuthorizationPolicies over soundMesh's names,
// as YAML, so that the parser makes the model.
type policyGen struct{ r *rand.Rand }

func (g *policyGen) pick(xs ...string) string { return xs[g.r.IntN(len(xs))] }

func (g *policyGen) list(xs ...string) string {
	n := 1 + g.r.IntN(2)
	var out []string
	for range n {
		out = append(out, fmt.Sprintf("%q", g.pick(xs...)))
	}
	return "[" + strings.Join(out, ", ") + "]"
}

func (g *policyGen) source() string {
	var fs []string
	for range 1 + g.r.IntN(2) {
		not := ""
		if g.r.IntN(3) == 0 {
			not = "not"
		}
		field := func(name string) string {
			if not != "" {
				return "not" + strings.ToUpper(name[:1]) + name[1:]
			}
			return name
		}
		switch g.r.IntN(4) {
		case 0:
			fs = append(fs, field("principals")+": "+g.list("cluster.local/ns/web/sa/front", "cluster.local/ns/web/sa/cron",
				"cluster.local/ns/other/sa/client", "cluster.local/ns/web/sa/api-canary", "cluster.local/ns/web/*", "*/sa/api", "*"))
		case 1:
			fs = append(fs, field("namespaces")+": "+g.list("web", "db", "other", "w*", "*"))
		case 2:
			fs = append(fs, field("ipBlocks")+": "+g.list("10.0.0.0/8", "192.168.0.0/16"))
		default:
			fs = append(fs, field("principals")+": "+g.list("cluster.local/ns/db/sa/store", "cluster.local/ns/web/sa/api"))
		}
	}
	return "{source: {" + strings.Join(fs, ", ") + "}}"
}

func (g *policyGen) operation() string {
	var fs []string
	for range 1 + g.r.IntN(2) {
		not := g.r.IntN(4) == 0
		name := func(s string) string {
			if not {
				return "not" + strings.ToUpper(s[:1]) + s[1:]
			}
			return s
		}
		switch g.r.IntN(4) {
		case 0:
			fs = append(fs, name("paths")+": "+g.list("/admin", "/api/*", "*", "/grpc.health.v1.Health/*"))
		case 1:
			fs = append(fs, name("methods")+": "+g.list("GET", "POST"))
		case 2:
			fs = append(fs, name("ports")+": "+g.list("8080", "9090", "9091", "5432", "80"))
		default:
			fs = append(fs, name("hosts")+": "+g.list("front.web", "*.web", "*"))
		}
	}
	return "{operation: {" + strings.Join(fs, ", ") + "}}"
}

func (g *policyGen) when() string {
	switch g.r.IntN(4) {
	case 0:
		return `{key: "request.headers[x-user]", values: ` + g.list("alice", "*") + "}"
	case 1:
		return `{key: "destination.ip", values: ` + g.list("10.0.0.1", "10.0.0.0/24", "10.0.1.1") + "}"
	case 2:
		return `{key: "source.namespace", notValues: ` + g.list("web", "other") + "}"
	}
	return `{key: "destination.port", values: ` + g.list("8080", "9090", "5432") + "}"
}

func (g *policyGen) rule() string {
	var parts []string
	if g.r.IntN(3) > 0 {
		var fs []string
		for range 1 + g.r.IntN(2) {
			fs = append(fs, g.source())
		}
		parts = append(parts, "from: ["+strings.Join(fs, ", ")+"]")
	}
	if g.r.IntN(2) == 0 {
		var os []string
		for range 1 + g.r.IntN(2) {
			os = append(os, g.operation())
		}
		parts = append(parts, "to: ["+strings.Join(os, ", ")+"]")
	}
	if g.r.IntN(4) == 0 {
		parts = append(parts, "when: ["+g.when()+"]")
	}
	return "{" + strings.Join(parts, ", ") + "}"
}

func (g *policyGen) policy(i int) string {
	ns := g.pick(root, "web", "web", "db")
	action := g.pick("ALLOW", "ALLOW", "ALLOW", "DENY", "DENY", "AUDIT", "CUSTOM")
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p%d\n  namespace: %s\n", i, ns)
	if g.r.IntN(6) == 0 && action != "AUDIT" && action != "CUSTOM" {
		b.WriteString("  annotations: {istio.io/dry-run: \"true\"}\n")
	}
	b.WriteString("spec:\n  action: " + action + "\n")
	if action == "CUSTOM" {
		b.WriteString("  provider: {name: \"rego:envoy/authz/allow\"}\n")
	}
	if sel := g.pick("", "", "app: front", "version: v2", "app: api", "app: store"); sel != "" {
		b.WriteString("  selector: {matchLabels: {" + sel + "}}\n")
	}
	if g.r.IntN(10) > 0 {
		var rs []string
		for range 1 + g.r.IntN(3) {
			rs = append(rs, g.rule())
		}
		b.WriteString("  rules: [" + strings.Join(rs, ", ") + "]\n")
	}
	return b.String()
}

// request is one concrete request from identity id to a workload.
func request(r *rand.Rand, id string, w *mesh.Workload, addr string, port uint32, http bool) *authv3.CheckRequest {
	a := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: id, Address: sockAddr([]string{"10.0.0.9", "192.168.1.1", "172.16.0.1"}[r.IntN(3)], 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: w.ID.String(), Labels: w.Labels,
			Address: sockAddr(addr, port)},
	}
	if http {
		pick := func(xs ...string) string { return xs[r.IntN(len(xs))] }
		host := pick("front.web", "api.web", "x.example", "front.web:80")
		method := pick("GET", "POST", "DELETE")
		path := pick("/admin", "/api/v1", "/", "/grpc.health.v1.Health/Check", "/other")
		h := map[string]string{":authority": host, ":method": method, ":path": path}
		if u := pick("", "alice", "bob"); u != "" {
			h["x-user"] = u
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: method, Host: host, Path: path, Headers: h, Protocol: "HTTP/1.1"}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func sockAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
}

// TestCellsAgreeWithTheEngine holds every cell of random policy sets
// (ALLOW, DENY, AUDIT, dry-run, and CUSTOM asking the example bundle) over
// soundMesh to the engine: for concrete requests from each identity of the
// caller to each workload of the service on the port, an allowed cell's
// requests are all allowed, a denied cell's all denied. A conditional cell
// may go either way; the test counts how many showed both, so that
// "conditional" is seen to mean something.
func TestCellsAgreeWithTheEngine(t *testing.T) {
	sets, perPair := 250, 12
	if testing.Short() {
		sets = 40
	}
	if raceEnabled {
		// The race detector finds nothing in this one goroutine's
		// computation and slows it tenfold: go test without it checks
		// them all.
		sets = 50
		t.Logf("race detector on: checking %d policy sets only; run without -race for all", sets)
	}
	// CUSTOM policies ask the example bundle, which decides on the
	// method, the path, the x-user header and, for TCP, the peer address.
	b, err := source.LoadBundle(source.BundleConfig{Path: "../../policies/envoy"})
	if err != nil {
		t.Fatal(err)
	}
	bundles := []engine.NamedBundle{{Name: "policies/envoy", Bundle: b}}
	g := &policyGen{r: rand.New(rand.NewPCG(18, 3))}
	m := soundMesh()
	counts := map[access.Verdict]int{}
	both := 0
	var failures []string
	for s := range sets {
		var docs []string
		for i := range 1 + g.r.IntN(5) {
			docs = append(docs, g.policy(i))
		}
		yaml := strings.Join(docs, "---\n")
		ps, err := policy.ParseYAML("gen", []byte(yaml), "default")
		if err != nil {
			t.Fatalf("set %d: %v\n%s", s, err, yaml)
		}
		set, err := engine.Build(context.Background(), engine.SetConfig{RootNamespace: root, Policies: ps, Bundles: bundles,
			// A loaded machine (the race detector, make test) must not time
			// the example bundle out.
			EvalTimeout: time.Minute})
		if err != nil {
			t.Fatalf("set %d: %v", s, err)
		}
		mx, err := access.Compute(ps, m, access.Options{RootNamespace: root, TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range mx.Cells {
			counts[c.Verdict]++
			from, svc := mx.Service(c.From), m.Service(c.To)
			var port mesh.Port
			for _, p := range svc.Ports {
				if p.Port == c.Port {
					port = p
				}
			}
			allowed, denied := 0, 0
			var example string
			for _, id := range from.Identities {
				for _, e := range svc.Endpoints {
					for range perPair {
						req := request(g.r, id, e.Workload, e.Address, e.TargetPort(port), port.Protocol.IsHTTP())
						d, err := set.Check(context.Background(), req)
						if err != nil {
							t.Fatal(err)
						}
						if d.Allowed {
							allowed++
						} else {
							denied++
						}
						if d.Allowed == (c.Verdict == access.Denied) && c.Verdict != access.Conditional && example == "" {
							example = fmt.Sprintf("the engine says allowed=%v (%s %s rule %s) for %s -> %s %s %s", d.Allowed, d.Reason, d.Policy, ruleString(d.Rule), id, e.Workload.Key(),
								req.GetAttributes().GetRequest().GetHttp().GetMethod(), req.GetAttributes().GetRequest().GetHttp().GetPath())
						}
					}
				}
			}
			if c.Verdict == access.Conditional && allowed > 0 && denied > 0 {
				both++
			}
			if example != "" && len(failures) < 10 {
				failures = append(failures, fmt.Sprintf("set %d: cell %s -> %s:%d is %s (%s, %s rule %s, %q) but %s\n%s",
					s, c.From, c.To, c.Port, c.Verdict, c.Reason, c.Policy, ruleString(c.Rule), c.Conditions, example, yaml))
			}
		}
	}
	t.Logf("%d policy sets: %d allowed, %d denied, %d conditional cells (%d conditional ones seen both allowed and denied)",
		sets, counts[access.Allowed], counts[access.Denied], counts[access.Conditional], both)
	for _, f := range failures {
		t.Error(f)
	}
	// The generators are fixed: these floors only catch a computation
	// that stopped answering anything but "conditional".
	if counts[access.Allowed] < sets || counts[access.Denied] < sets || both < sets/4 {
		t.Errorf("too few decided cells to test: %v, %d conditional both ways", counts, both)
	}
}

func ruleString(r *int) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprint(*r)
}
