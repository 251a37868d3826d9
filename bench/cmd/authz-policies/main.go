// Command authz-policies writes N Istio AuthorizationPolicies for the
// authz benchmark (bench/authz.sh), deterministically from -seed: the same
// flags always write the same file.
//
// The mix is what a mesh holds: most policies select workloads by label in
// namespaces of their own; some sit in the namespaces the benchmark's
// requests (shared/bench extauthz-load testdata/requests.json) reach but
// select other workloads; a few are mesh-wide in the root namespace. Their
// rules draw on principals, namespaces, methods, paths (exact, prefix,
// suffix, templates), ports, ipBlocks and notX fields, and about one in
// ten is a DENY. A fixed core of policies (written whatever N is, and
// counted in N) decides the sample requests: requests to catalog and orders
// meet ALLOW and DENY policies, requests to ops meet none that apply (its
// policies select a workload the requests do not name), so the 20 requests
// hit a mix of no-policy, allow and deny.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
)

func main() {
	n := flag.Int("n", 1000, "number of policies (at least the core's)")
	seed := flag.Uint64("seed", 1, "seed of the generated mix")
	out := flag.String("out", "", "file to write (default: stdout)")
	root := flag.String("root-namespace", "istio-system", "root namespace of the mesh-wide policies")
	flag.Parse()
	if *n < len(core) {
		fmt.Fprintf(os.Stderr, "authz-policies: -n must be at least %d (the core policies)\n", len(core))
		os.Exit(2)
	}
	w := os.Stdout
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			fmt.Fprintf(os.Stderr, "authz-policies: %v\n", err)
			os.Exit(1)
		}
		defer f.Close()
		w = f
	}
	bw := bufio.NewWriter(w)
	write(bw, *n, *seed, *root)
	if err := bw.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "authz-policies: %v\n", err)
		os.Exit(1)
	}
}

// core decides the sample requests.
var core = []string{`
metadata: {name: catalog-readers, namespace: catalog}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/frontend/sa/*"]}
    to:
    - operation: {methods: ["GET", "HEAD"], paths: ["/api/v1/catalog/*"]}
  - to:
    - operation: {methods: ["GET"], paths: ["/healthz"]}`, `
metadata: {name: orders-checkout, namespace: orders}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/checkout/sa/checkout"]}
    to:
    - operation: {methods: ["GET", "POST", "DELETE"], paths: ["/api/v1/orders", "/api/v1/orders/*"]}
  - from:
    - source: {namespaces: ["payments"]}
    to:
    - operation: {methods: ["PUT", "PATCH"], paths: ["/api/v1/orders/{*}/status"]}`, `
metadata: {name: orders-no-delete, namespace: orders}
spec:
  action: DENY
  rules:
  - to:
    - operation: {methods: ["DELETE"]}`, `
metadata: {name: control-panel-ops, namespace: ops}
spec:
  selector:
    matchLabels: {app: control-panel}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/ops/sa/admin", "cluster.local/ns/ops/sa/oncall"]}
    to:
    - operation: {paths: ["/admin/*"]}`,
}

// sampleNamespaces are the namespaces the sample requests reach.
var sampleNamespaces = []string{"catalog", "orders", "ops"}

var (
	methods  = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
	segments = []string{"api", "v1", "v2", "users", "items", "orders", "reports", "internal", "status", "metrics", "search", "export"}
	apps     = []string{"web", "api", "worker", "db-proxy", "cache", "gateway", "billing", "search", "ledger", "notifier"}
)

func write(w *bufio.Writer, n int, seed uint64, root string) {
	r := rand.New(rand.NewPCG(seed, 0x7a75))
	nsCount := n/20 + 1
	ns := func() string { return fmt.Sprintf("team-%03d", r.IntN(nsCount)) }
	pick := func(xs []string) string { return xs[r.IntN(len(xs))] }
	principal := func() string {
		return fmt.Sprintf("cluster.local/ns/%s/sa/%s", ns(), pick(apps))
	}
	path := func() string {
		p := "/" + pick(segments) + "/" + pick(segments)
		switch r.IntN(4) {
		case 0:
			return p
		case 1:
			return p + "/*"
		case 2:
			return "*/" + pick(segments)
		default:
			return p + "/{*}/" + pick(segments)
		}
	}
	list := func(k int, f func() string) string {
		xs := make([]string, k)
		for i := range xs {
			xs[i] = fmt.Sprintf("%q", f())
		}
		return "[" + strings.Join(xs, ", ") + "]"
	}

	for _, c := range core {
		fmt.Fprintf(w, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy%s\n---\n", c)
	}
	for i := len(core); i < n; i++ {
		var namespace string
		selector := true
		switch x := r.IntN(100); {
		case x < 10: // beside the sample requests' workloads, selecting others
			namespace = pick(sampleNamespaces)
		case x < 13: // mesh-wide, selecting some workload
			namespace = root
		default:
			namespace = ns()
			selector = r.IntN(5) != 0
		}
		action := "ALLOW"
		if r.IntN(10) == 0 {
			action = "DENY"
		}
		fmt.Fprintf(w, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: gen-%05d, namespace: %s}\nspec:\n", i, namespace)
		if selector {
			fmt.Fprintf(w, "  selector:\n    matchLabels: {app: %s, version: v%d}\n", pick(apps), r.IntN(3)+1)
		}
		fmt.Fprintf(w, "  action: %s\n  rules:\n", action)
		for k := r.IntN(3) + 1; k > 0; k-- {
			fmt.Fprintf(w, "  - from:\n    - source:\n")
			switch r.IntN(4) {
			case 0:
				fmt.Fprintf(w, "        namespaces: %s\n", list(r.IntN(2)+1, ns))
			case 1:
				fmt.Fprintf(w, "        ipBlocks: [\"10.%d.0.0/16\", \"192.168.%d.0/24\"]\n", r.IntN(256), r.IntN(256))
				fmt.Fprintf(w, "        principals: %s\n", list(1, principal))
			case 2:
				fmt.Fprintf(w, "        notPrincipals: %s\n", list(r.IntN(2)+1, principal))
			default:
				fmt.Fprintf(w, "        principals: %s\n", list(r.IntN(3)+1, principal))
			}
			fmt.Fprintf(w, "    to:\n    - operation:\n        methods: %s\n        paths: %s\n",
				list(r.IntN(2)+1, func() string { return pick(methods) }), list(r.IntN(3)+1, path))
			if r.IntN(3) == 0 {
				fmt.Fprintf(w, "        ports: [\"%d\"]\n", 8000+r.IntN(100))
			}
			if r.IntN(4) == 0 {
				fmt.Fprintf(w, "        notPaths: [%q]\n", "/"+pick(segments)+"/internal/*")
			}
		}
		fmt.Fprintf(w, "---\n")
	}
}
