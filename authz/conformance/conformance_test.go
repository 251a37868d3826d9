package conformance_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/backendtest"
	"github.com/trustmesh/trustmesh/authz/pathnorm"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/rbac"
	"github.com/trustmesh/trustmesh/test/envoyrbac"
)

// committedCorpus is the corpus of the fixed seed; `make test` adds a fresh
// one through corpusEnv.
const (
	committedCorpus = "../testdata/istio-oracle/corpus-seed1.jsonl.gz"
	corpusEnv       = "TRUSTMESH_ORACLE_CORPUS"
	minCases        = 10000
	rootNamespace   = "istio-system"
)

// TestIstioOracle runs every case of the corpora through the engine (the
// ext_authz Check path) on its native back end, which serves, and on its
// Rego back end, and through the RBAC back end, and holds each to Istio's
// decision; the Rego back end is held to the native one's decision
// (allowed, policy, rule, reason, audit, dry run), and so to Istio.
func TestIstioOracle(t *testing.T) {
	files := []string{committedCorpus}
	if extra := os.Getenv(corpusEnv); extra != "" {
		files = append(files, filepath.SplitList(extra)...)
	}
	total := 0
	for _, f := range files {
		cases, err := conformance.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if len(cases) == 0 {
			t.Fatalf("%s: no cases", f)
		}
		t.Run(filepath.Base(f), func(t *testing.T) {
			r := newRunner(t)
			for i := range cases {
				r.run(&cases[i])
			}
			r.report(t, f)
		})
		total += len(cases)
	}
	if total < minCases {
		t.Fatalf("%d cases, want at least %d", total, minCases)
	}
}

// runner checks cases, compiling each policy set once.
type runner struct {
	t        *testing.T
	rawKey   string
	policies []*policy.Policy
	set      *engine.Set // native
	pair     *backendtest.Pair
	loadErr  error

	cases, allowed int
	// byClass counts the documented differences by class.
	byClass map[string]int
	// failures are the disagreements, by back end and class.
	failures map[string][]failure
}

func newRunner(t *testing.T) *runner {
	return &runner{t: t, byClass: map[string]int{}, failures: map[string][]failure{}}
}

func (r *runner) load(c *conformance.Case) {
	if string(c.Policies) == r.rawKey {
		return
	}
	r.rawKey, r.policies, r.set, r.pair, r.loadErr = string(c.Policies), nil, nil, nil, nil
	var objs []json.RawMessage
	if err := json.Unmarshal(c.Policies, &objs); err != nil {
		r.loadErr = err
		return
	}
	docs := make([]string, len(objs))
	for i, o := range objs {
		docs[i] = string(o)
	}
	ps, err := policy.ParseYAML(fmt.Sprintf("case %d", c.N), []byte(strings.Join(docs, "\n---\n")), "default")
	if err != nil {
		r.loadErr = err
		return
	}
	r.policies = ps
	r.set, r.loadErr = engine.Build(context.Background(), engine.SetConfig{
		RootNamespace: rootNamespace,
		Policies:      ps,
		Gateways:      engine.NewGatewayIDs(conformance.GatewayIdentities...),
	})
	if r.loadErr == nil {
		r.pair, r.loadErr = backendtest.NewPair(context.Background(), r.set)
	}
}

func (r *runner) run(c *conformance.Case) {
	r.cases++
	if c.Expect.Allow {
		r.allowed++
	}
	if c.Expect.Allow != c.Expect.IstioAllow {
		// Where an Istio sidecar would take remote.ip from what any peer
		// sent, trustmesh takes it only from a gateway: documented in
		// authz/README.md.
		r.byClass["remote.ip from a non-gateway peer (README: remote.ip per listener)"]++
	}
	r.load(c)
	if r.loadErr != nil {
		r.fail("load", c, fmt.Sprintf("policies refused: %v", r.loadErr))
		return
	}
	req := checkRequest(&c.Request)

	// The Rego back end is held to the native one's whole decision, and
	// so to Istio through it; TestExplainOracleCorpus holds the rules the
	// native back end matched to the Rego field outcomes.
	d, msgs, err := r.pair.Decide(context.Background(), req)
	switch {
	case err != nil:
		r.fail("engine", c, fmt.Sprintf("error: %v", err))
	case d.Allowed != c.Expect.Allow:
		r.disagree("engine", c, fmt.Sprintf("engine allowed=%t (%s %s), Istio allowed=%t", d.Allowed, d.Reason, d.Policy, c.Expect.Allow))
	}
	if len(msgs) > 0 {
		r.fail("native vs rego", c, strings.Join(msgs, "; "))
	}

	got, err := rbacAllows(r.policies, &c.Request, c.Expect.RemoteIP)
	switch {
	case err != nil:
		r.fail("rbac", c, fmt.Sprintf("error: %v", err))
	case got != c.Expect.Allow:
		r.disagree("rbac", c, fmt.Sprintf("RBAC back end allowed=%t, Istio allowed=%t", got, c.Expect.Allow))
	}
}

// disagree counts a documented difference, or fails.
func (r *runner) disagree(backEnd string, c *conformance.Case, msg string) {
	if class := r.documented(c); class != "" {
		r.byClass[backEnd+": "+class]++
		return
	}
	r.fail(backEnd, c, msg)
}

// documented names the difference authz/README.md lists that explains
// trustmesh denying what Istio allows, or "". Only deny-ward differences
// are ever documented.
func (r *runner) documented(c *conformance.Case) string {
	if !c.Expect.Allow {
		return ""
	}
	if c.Request.Principal == "" && r.negatedPeerAllow(c) {
		return "a negated peer field in an ALLOW policy never matches a request without a peer identity (README)"
	}
	return ""
}

// negatedPeerAllow reports whether Istio allowed the request only through
// ALLOW rules that negate a peer field (its matched RBAC policies are named
// ns[NS]-policy[NAME]-rule[I]), which trustmesh never matches without a peer
// identity.
func (r *runner) negatedPeerAllow(c *conformance.Case) bool {
	byName := map[string]*policy.Policy{}
	for _, p := range r.policies {
		byName[p.Namespace+"/"+p.Name] = p
	}
	viaNegation := false
	for _, m := range c.Expect.Matched {
		name, ok := strings.CutPrefix(m, "allow:")
		if !ok {
			continue
		}
		var ns, pol string
		var i int
		if _, err := fmt.Sscanf(strings.NewReplacer("[", " ", "]", " ").Replace(name), "ns %s -policy %s -rule %d", &ns, &pol, &i); err != nil {
			return false
		}
		p := byName[ns+"/"+pol]
		if p == nil || p.Action != policy.Allow || i >= len(p.Rules) {
			return false
		}
		negated := false
		p.Rules[i].EachField(func(f policy.Field) { negated = negated || f.Not && f.Attr.NeedsPeer() })
		if !negated {
			return false // Istio allowed through a rule trustmesh treats the same
		}
		viaNegation = true
	}
	return viaNegation
}

func (r *runner) fail(backEnd string, c *conformance.Case, msg string) {
	r.failures[backEnd] = append(r.failures[backEnd], failure{shape: shape(c), text: fmt.Sprintf("seed %d case %d: %s\n  policies: %s\n  request: %s\n  expect: %s",
		c.Seed, c.N, msg, c.Policies, mustJSON(c.Request), mustJSON(c.Expect))})
}

// failure is one disagreement; shape groups similar ones in the report.
type failure struct {
	shape string
	text  string
}

func shape(c *conformance.Case) string {
	dir := "allows what Istio denies"
	if c.Expect.Allow {
		dir = "denies what Istio allows"
	}
	proto := "http"
	if c.Request.TCP {
		proto = "tcp"
	}
	peer := "peer"
	if c.Request.Principal == "" {
		peer = "no peer"
	}
	return dir + ", " + proto + ", " + peer
}

func (r *runner) report(t *testing.T, file string) {
	t.Logf("%s: %d cases, %d allowed by Istio", file, r.cases, r.allowed)
	for _, k := range sortedKeys(r.byClass) {
		t.Logf("documented difference: %s: %d cases", k, r.byClass[k])
	}
	if r.allowed == 0 || r.allowed == r.cases {
		t.Errorf("every case got the same decision: the corpus shows nothing")
	}
	for _, be := range sortedKeys(r.failures) {
		fs := r.failures[be]
		t.Errorf("%s: %d disagreements with Istio (the seed is in each case; regenerate with: cd test/istio-oracle && go run . -seed SEED -cases N)", be, len(fs))
		// One example of each shape, the shortest.
		byShape := map[string][]failure{}
		for _, f := range fs {
			byShape[f.shape] = append(byShape[f.shape], f)
		}
		for _, sh := range sortedKeys(byShape) {
			ex := byShape[sh][0]
			for _, f := range byShape[sh] {
				if len(f.text) < len(ex.text) {
					ex = f
				}
			}
			t.Errorf("%s: %s: %d cases, e.g. %s", be, sh, len(byShape[sh]), ex.text)
		}
	}
}

// checkRequest is the CheckRequest the destination's Envoy sends for the
// request, with the x-envoy-external-address it carries: at a gateway,
// Envoy sets it (use_remote_address) to the address it derived; at a
// sidecar, it is whatever the peer sent.
func checkRequest(r *conformance.Request) *authv3.CheckRequest {
	a := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: r.Principal, Address: address(r.PeerIP, 40000)},
		Destination: &authv3.AttributeContext_Peer{
			Principal: "spiffe://cluster.local/ns/" + r.Dest.Namespace + "/sa/" + r.Dest.ServiceAccount,
			Labels:    r.Dest.Labels,
			Address:   address(r.Dest.IP, r.Dest.Port),
		},
	}
	if r.SNI != "" {
		a.TlsSession = &authv3.AttributeContext_TLSSession{Sni: r.SNI}
	}
	if !r.TCP {
		h := map[string]string{":authority": r.Host, ":method": r.Method, ":path": r.Path}
		for k, v := range r.Headers {
			h[strings.ToLower(k)] = v
		}
		switch {
		case r.Listener == conformance.Gateway && r.Forwarded == "":
			h[engine.ExternalAddressHeader] = r.PeerIP
		case r.Forwarded != "":
			h[engine.ExternalAddressHeader] = r.Forwarded
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: r.Method, Host: r.Host, Path: r.Path, Headers: h, Protocol: "HTTP/1.1",
		}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func address(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// rbacAllows compiles the policies that apply to the destination with the
// RBAC back end and runs its filters (DENY, then ALLOW; shadow and AUDIT
// filters never enforce) with Envoy's semantics.
func rbacAllows(ps []*policy.Policy, r *conformance.Request, remoteIP string) (bool, error) {
	fs, err := rbac.Build(policy.Applicable(ps, rootNamespace, r.Dest.Namespace, r.Dest.Labels), r.TCP)
	if err != nil {
		return false, err
	}
	er := &envoyrbac.Request{HTTP: !r.TCP, Principal: r.Principal, DestPort: r.Dest.Port, SNI: r.SNI}
	er.DirectRemoteIP, _ = netip.ParseAddr(r.PeerIP)
	er.RemoteIP, _ = netip.ParseAddr(remoteIP)
	er.DestinationIP, _ = netip.ParseAddr(r.Dest.IP)
	if !r.TCP {
		path, err := pathnorm.Normalize(r.Path)
		if err != nil {
			return false, nil // the listener rejects the request
		}
		if i := strings.IndexByte(r.Path, '?'); i >= 0 {
			path += r.Path[i:]
		}
		er.Headers = map[string]string{":authority": r.Host, ":method": r.Method, ":path": path}
		for k, v := range r.Headers {
			er.Headers[strings.ToLower(k)] = v
		}
	}
	for _, rules := range []*rbacv3.RBAC{fs.Deny, fs.Allow} {
		ok, err := envoyrbac.Allows(rules, er)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestIstioOracleDump prints what the back ends make of one case of the
// committed corpus: TRUSTMESH_ORACLE_DUMP=N.
func TestIstioOracleDump(t *testing.T) {
	n, err := strconv.Atoi(os.Getenv("TRUSTMESH_ORACLE_DUMP"))
	if err != nil {
		t.Skip("TRUSTMESH_ORACLE_DUMP is not a case number")
	}
	cases, err := conformance.ReadFile(committedCorpus)
	if err != nil {
		t.Fatal(err)
	}
	for i := range cases {
		c := &cases[i]
		if c.N != n {
			continue
		}
		r := newRunner(t)
		r.load(c)
		if r.loadErr != nil {
			t.Fatal(r.loadErr)
		}
		d, err := r.set.Check(context.Background(), checkRequest(&c.Request))
		t.Logf("engine: %s (%v)", mustJSON(d), err)
		fs, err := rbac.Build(policy.Applicable(r.policies, rootNamespace, c.Request.Dest.Namespace, c.Request.Dest.Labels), c.Request.TCP)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("rbac deny: %s", protojson.Format(fs.Deny))
		t.Logf("rbac allow: %s", protojson.Format(fs.Allow))
		t.Logf("case: %s", mustJSON(c))
	}
}
