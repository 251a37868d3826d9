package engine_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/backendtest"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// The vocabulary of the differential test: values chosen so that random
// policies and requests often meet, in every kind of value (exact, prefix,
// suffix, presence, template, CIDR, port), negated or not, on HTTP and TCP,
// with and without a peer identity.
var (
	diffNamespaces = []string{"foo", "bar", "istio-system"}
	diffActions    = []string{"ALLOW", "ALLOW", "DENY", "AUDIT"}
	diffSource     = map[string][]string{
		"principals":     {"cluster.local/ns/foo/sa/a", "cluster.local/ns/bar/*", "*/sa/b", "*", "other.td/ns/foo/sa/x"},
		"namespaces":     {"foo", "ba*", "*ar", "*", "istio-system"},
		"ipBlocks":       {"10.0.0.0/8", "10.0.0.1", "192.168.0.0/16", "::1", "::ffff:10.0.0.0/104", "2001:db8::/32"},
		"remoteIpBlocks": {"10.0.0.0/8", "203.0.113.7", "198.51.100.0/24"},
	}
	diffOperation = map[string][]string{
		"hosts":   {"a.foo", "a.foo:80", "*.foo", "A.*", "*", "b.bar"},
		"ports":   {"80", "8080", "443"},
		"methods": {"GET", "POST", "*", "G*"},
		"paths":   {"/admin", "/public/*", "*/x", "/api/{*}/orders", "/api/{**}", "*", "/"},
	}
	diffWhen = map[string][]string{
		"request.headers[x-a]":  {"v", "v*", "*", "*z"},
		"source.ip":             {"10.0.0.0/8", "::1"},
		"remote.ip":             {"203.0.113.7", "10.0.0.0/8"},
		"destination.ip":        {"10.1.0.0/16", "2001:db8::1"},
		"destination.port":      {"80", "8080"},
		"connection.sni":        {"a.foo", "*.foo", "*"},
		"source.namespace":      {"foo", "ba*", "*"},
		"source.principal":      {"cluster.local/ns/foo/sa/a", "*/sa/b"},
		"request.headers[x-b]":  {"1", "2"},
		"source.serviceAccount": {"foo/a", "bar/b"},
	}
	diffPrincipals = []string{"", "spiffe://cluster.local/ns/foo/sa/a", "spiffe://cluster.local/ns/bar/sa/b",
		"spiffe://other.td/ns/foo/sa/x", "spiffe://cluster.local/ns/foo/sa/a/extra", "spiffe://ns/foo/bar",
		"spiffe://cluster.local/ns/foo/x/sa/b", "not-spiffe"}
	diffIPs     = []string{"10.0.0.1", "192.168.1.5", "::1", "2001:db8::1", "", "::ffff:10.1.2.3", "fe80::1%eth0"}
	diffHosts   = []string{"a.foo", "a.foo:80", "A.FOO.", "b.bar", "", "[::1]:80"}
	diffPaths   = []string{"/", "/admin", "/a/../admin", "//admin", "/public/x", "/api/v1/orders", "/api/v1/v2/orders?q=1", "/%61dmin", "/x", "admin", "/a%2fb"}
	diffMethods = []string{"GET", "POST", "PUT", ""}
)

func pick[T any](rng *rand.Rand, xs []T) T { return xs[rng.IntN(len(xs))] }

// pickValues returns one to three values of a field, quoted for YAML.
func pickValues(rng *rand.Rand, vs []string) string {
	n := 1 + rng.IntN(3)
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%q", pick(rng, vs))
	}
	return "[" + strings.Join(out, ", ") + "]"
}

// pickFields writes one to three fields of a source or operation, some
// negated.
func pickFields(rng *rand.Rand, b *strings.Builder, fields map[string][]string, indent string) {
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	// Map order is random; sort for a seed to mean one policy.
	sortStrings(names)
	for range 1 + rng.IntN(3) {
		name := pick(rng, names)
		field := name
		if rng.IntN(3) == 0 {
			field = "not" + strings.ToUpper(name[:1]) + name[1:]
		}
		fmt.Fprintf(b, "%s%s: %s\n", indent, field, pickValues(rng, fields[name]))
	}
}

func sortStrings(xs []string) {
	for i := 1; i < len(xs); i++ {
		for j := i; j > 0 && xs[j] < xs[j-1]; j-- {
			xs[j], xs[j-1] = xs[j-1], xs[j]
		}
	}
}

// randomPolicies returns one to four policies the parser admits.
func randomPolicies(rng *rand.Rand) []*policy.Policy {
	var out []*policy.Policy
	for i := range 1 + rng.IntN(4) {
		for range 20 {
			var b strings.Builder
			fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p%d\n  namespace: %s\n", i, pick(rng, diffNamespaces))
			if rng.IntN(5) == 0 {
				b.WriteString("  annotations: {istio.io/dry-run: \"true\"}\n")
			}
			fmt.Fprintf(&b, "spec:\n  action: %s\n", pick(rng, diffActions))
			if rng.IntN(2) == 0 {
				fmt.Fprintf(&b, "  selector: {matchLabels: {app: %s}}\n", pick(rng, []string{"a", "b"}))
			}
			if rng.IntN(8) > 0 {
				b.WriteString("  rules:\n")
				for range 1 + rng.IntN(3) {
					b.WriteString("  - {}\n")
					rule := b.Len() - len("{}\n")
					var body strings.Builder
					if rng.IntN(2) == 0 {
						body.WriteString("    from:\n")
						for range 1 + rng.IntN(2) {
							body.WriteString("    - source:\n")
							pickFields(rng, &body, diffSource, "        ")
						}
					}
					if rng.IntN(2) == 0 {
						body.WriteString("    to:\n")
						for range 1 + rng.IntN(2) {
							body.WriteString("    - operation:\n")
							pickFields(rng, &body, diffOperation, "        ")
						}
					}
					if rng.IntN(3) == 0 {
						body.WriteString("    when:\n")
						for range 1 + rng.IntN(2) {
							keys := make([]string, 0, len(diffWhen))
							for k := range diffWhen {
								keys = append(keys, k)
							}
							sortStrings(keys)
							k := pick(rng, keys)
							values := "values"
							if rng.IntN(3) == 0 {
								values = "notValues"
							}
							fmt.Fprintf(&body, "    - key: %q\n      %s: %s\n", k, values, pickValues(rng, diffWhen[k]))
						}
					}
					if body.Len() > 0 {
						s := b.String()[:rule]
						b.Reset()
						b.WriteString(s)
						b.WriteString("\n")
						b.WriteString(body.String())
					}
				}
			}
			ps, err := policy.ParseYAML("random.yaml", []byte(b.String()), "default")
			if err == nil {
				out = append(out, ps...)
				break
			}
		}
	}
	return out
}

func randomRequest(rng *rand.Rand) *authv3.CheckRequest {
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	a := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: pick(rng, diffPrincipals), Address: addr(pick(rng, diffIPs), 40000)},
		Destination: &authv3.AttributeContext_Peer{
			Principal: "spiffe://cluster.local/ns/" + pick(rng, []string{"foo", "bar"}) + "/sa/web",
			Labels:    map[string]string{"app": pick(rng, []string{"a", "b", "c"})},
			Address:   addr(pick(rng, []string{"10.1.2.3", "2001:db8::1", ""}), pick(rng, []uint32{80, 8080, 443})),
		},
	}
	if rng.IntN(3) == 0 {
		a.TlsSession = &authv3.AttributeContext_TLSSession{Sni: pick(rng, []string{"a.foo", "b.bar", ""})}
	}
	if rng.IntN(4) > 0 {
		hs := map[string]string{}
		for _, h := range []struct{ k, v string }{{"x-a", "v1"}, {"X-A", "vz"}, {"x-a", ""}, {"x-b", "2"},
			{engine.ExternalAddressHeader, "203.0.113.7"}} {
			if rng.IntN(3) == 0 {
				hs[h.k] = h.v
			}
		}
		http := &authv3.AttributeContext_HttpRequest{Method: pick(rng, diffMethods), Host: pick(rng, diffHosts), Path: pick(rng, diffPaths), Headers: hs}
		if rng.IntN(6) == 0 {
			http.HeaderMap = &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: "X-B", Value: "1"}, {Key: "x-a", RawValue: []byte("v")}}}
		}
		a.Request = &authv3.AttributeContext_Request{Http: http}
	}
	return &authv3.CheckRequest{Attributes: a}
}

// TestBackendsAgreeOnRandomPolicies is the differential test of the two
// back ends: random policy sets, random requests, identical decisions
// and matching rules. Its seeds are fixed, so a failure reproduces;
// TRUSTMESH_DIFF_SETS raises the count.
func TestBackendsAgreeOnRandomPolicies(t *testing.T) {
	ctx := context.Background()
	sets := 100
	if testing.Short() {
		sets = 25
	}
	if n, err := fmt.Sscan(os.Getenv("TRUSTMESH_DIFF_SETS"), &sets); n == 1 && err == nil {
		t.Logf("%d sets", sets)
	}
	checked, evaluated := 0, 0
	for seed := range uint64(sets) {
		rng := rand.New(rand.NewPCG(seed, 11))
		ps := randomPolicies(rng)
		set, err := engine.Build(ctx, engine.SetConfig{Policies: ps, RootNamespace: "istio-system",
			Gateways: engine.NewGatewayIDs("spiffe://cluster.local/ns/bar/sa/b")})
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		pair, err := backendtest.NewPair(ctx, set)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for i := range 40 {
			req := randomRequest(rng)
			checked++
			if d, _ := set.Check(ctx, req); d.Applied > 0 {
				evaluated++
			}
			if msgs := pair.Disagreements(ctx, req); len(msgs) > 0 {
				var src strings.Builder
				for _, m := range set.Modules() {
					src.WriteString(m)
				}
				t.Fatalf("seed %d request %d: %s\nrequest: %v\npolicies:\n%s", seed, i, strings.Join(msgs, "\n"), req, src.String())
			}
		}
	}
	t.Logf("%d requests, %d with policies to evaluate", checked, evaluated)
	if evaluated < checked/4 {
		t.Fatalf("only %d of %d requests met a policy: the generator tests little", evaluated, checked)
	}
}
