package engine_test

import (
	"context"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/pathnorm"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// fuzzPolicies apply to workload app=web in namespace foo: two ALLOW rules
// and a DENY. The oracle below restates, independently of the Rego back
// end, when the ALLOW policy can match.
const fuzzPolicies = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bar/sa/client"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/public/*"]}}]
  - to: [{operation: {paths: ["/exact"]}}]
    when: [{key: "request.headers[x-token]", values: ["secret"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/public/admin*"]}}]
`

// allowMatches is the oracle: whether the ALLOW policy matches req.
func allowMatches(req *authv3.CheckRequest) bool {
	h := req.GetAttributes().GetRequest().GetHttp()
	if h == nil {
		return false // both rules use HTTP-only fields: dropped for TCP
	}
	p, err := pathnorm.Normalize(h.GetPath())
	if err != nil {
		return false
	}
	r0 := req.GetAttributes().GetSource().GetPrincipal() == "spiffe://cluster.local/ns/bar/sa/client" &&
		h.GetMethod() == "GET" && strings.HasPrefix(p, "/public/")
	token, ok := h.GetHeaders()["x-token"]
	if !ok {
		for k, v := range h.GetHeaders() {
			if strings.ToLower(k) == "x-token" {
				token, ok = v, true
			}
		}
	}
	r1 := p == "/exact" && ok && token == "secret"
	return r0 || r1
}

// allowApplies says whether the ALLOW policy applies to the destination.
func allowApplies(req *authv3.CheckRequest) bool {
	d := req.GetAttributes().GetDestination()
	id, ok := engine.ParseIdentity(d.GetPrincipal())
	return ok && id.Namespace == "foo" && d.GetLabels()["app"] == "web"
}

// FuzzCheck feeds arbitrary CheckRequests to the engine: it never panics,
// and it never allows a request that no ALLOW policy matches while ALLOW
// policies apply.
func FuzzCheck(f *testing.F) {
	ps, err := policy.ParseYAML("fuzz.yaml", []byte(fuzzPolicies), "default")
	if err != nil {
		f.Fatal(err)
	}
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
	if err != nil {
		f.Fatal(err)
	}
	seed, _ := proto.Marshal(fuzzRequest("GET", "/public/x", "spiffe://cluster.local/ns/bar/sa/client", "", "web", "foo", false))
	f.Add(seed, "GET", "/public/x", "spiffe://cluster.local/ns/bar/sa/client", "", "web", "foo", false)
	f.Add([]byte{}, "POST", "/exact?a=b", "", "secret", "web", "foo", false)
	f.Add([]byte{}, "GET", "/public/../exact", "", "secret", "web", "foo", true)
	f.Add([]byte{}, "GET", "//public/%61dmin", "spiffe://cluster.local/ns/bar/sa/client", "", "web", "foo", false)
	f.Fuzz(func(t *testing.T, raw []byte, method, path, principal, token, app, ns string, tcp bool) {
		reqs := []*authv3.CheckRequest{fuzzRequest(method, path, principal, token, app, ns, tcp)}
		var arbitrary authv3.CheckRequest
		if proto.Unmarshal(raw, &arbitrary) == nil {
			reqs = append(reqs, &arbitrary)
		}
		for _, req := range reqs {
			d, err := set.Check(context.Background(), req)
			if d == nil {
				t.Fatal("nil decision")
			}
			if err != nil && d.Allowed {
				t.Fatalf("an error allowed: %v", err)
			}
			if d.Allowed && allowApplies(req) && !allowMatches(req) {
				t.Fatalf("allowed a request the ALLOW policy does not match: %v (%+v)", req, d)
			}
			if d.Allowed && allowApplies(req) && req.GetAttributes().GetRequest().GetHttp() != nil {
				if p, _ := pathnorm.Normalize(req.GetAttributes().GetRequest().GetHttp().GetPath()); strings.HasPrefix(p, "/public/admin") {
					t.Fatalf("allowed a path the DENY policy matches: %v", req)
				}
			}
		}
	})
}

func fuzzRequest(method, path, principal, token, app, ns string, tcp bool) *authv3.CheckRequest {
	a := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: principal, Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/" + ns + "/sa/web", Labels: map[string]string{"app": app}},
	}
	if !tcp {
		hs := map[string]string{}
		if token != "" {
			hs["x-token"] = token
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: method, Path: path, Host: "web", Headers: hs}}
	}
	return &authv3.CheckRequest{Attributes: a}
}
