package main

import (
	"fmt"
	"math/rand/v2"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/trustmesh/trustmesh/authz/conformance"
)

// The generator draws from small pools, so that values match often and
// attributes are often absent: no peer, no SNI, missing headers.

const rootNamespace = "istio-system"

// workload is a destination the cases send to.
type workload struct {
	listener string
	dest     conformance.Workload
}

var workloads = []workload{
	{conformance.Sidecar, conformance.Workload{Namespace: "foo", ServiceAccount: "web", Labels: map[string]string{"app": "web", "version": "v1"}}},
	{conformance.Sidecar, conformance.Workload{Namespace: "foo", ServiceAccount: "api", Labels: map[string]string{"app": "api"}}},
	{conformance.Sidecar, conformance.Workload{Namespace: "bar", ServiceAccount: "web", Labels: map[string]string{"app": "web"}}},
	{conformance.Gateway, conformance.Workload{Namespace: rootNamespace, ServiceAccount: "istio-ingressgateway", Labels: map[string]string{"istio": "ingressgateway", "app": "istio-ingressgateway"}}},
}

var (
	peers = []string{
		"spiffe://cluster.local/ns/bar/sa/client",
		"spiffe://cluster.local/ns/foo/sa/web",
		"spiffe://cluster.local/ns/foo/sa/admin",
		"spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway",
		"spiffe://other.td/ns/bar/sa/client",
		"spiffe://cluster.local/ns/baz/sa/default",
	}
	peerIPs      = []string{"10.0.0.1", "10.0.0.9", "10.1.2.3", "192.168.1.5", "2001:db8::1"}
	forwardedIPs = []string{"203.0.113.7", "198.51.100.9", "10.0.0.1", "2001:db8::7", "192.168.1.5"}
	destIPs      = []string{"10.0.0.2", "10.0.0.3", "2001:db8::2"}
	destPorts    = []uint32{8080, 9080, 443}
	snis         = []string{"web.foo.svc.cluster.local", "outbound_.8080_._.web.foo.svc.cluster.local", "api.example.com"}
	hosts        = []string{"web.foo.svc.cluster.local", "admin.example.com", "Admin.Example.COM", "api.example.com", "api.internal"}
	methods      = []string{"GET", "POST", "DELETE", "PUT"}
	reqPaths     = []string{"/", "/admin", "/admin/users", "/api/v1/items", "/api/v1/items/42", "/api/v2/items", "/public/index.html", "/api/v1/"}
	queries      = []string{"", "", "", "?q=1", "?admin=true"}
	headerNames  = []string{"x-user", "x-env", "user-agent"}
	headerVals   = []string{"alice", "bob", "", "prod", "staging", "curl/8.0"}

	principalVals = []string{"cluster.local/ns/bar/sa/client", "cluster.local/ns/foo/*", "*/sa/client", "*",
		"cluster.local/ns/istio-system/sa/istio-ingressgateway", "other.td/*", "*/sa/web", "cluster.local/ns/foo/sa/admin"}
	namespaceVals = []string{"bar", "foo", "istio-system", "*", "ba*", "*o", "baz"}
	saVals        = []string{"bar/client", "client", "istio-system/istio-ingressgateway", "foo/web", "web"}
	tdVals        = []string{"cluster.local", "other.td", "*", "cluster.*", "*.td"}
	cidrVals      = []string{"10.0.0.0/8", "10.0.0.1", "10.0.0.1/32", "192.168.0.0/16", "203.0.113.0/24", "2001:db8::/32", "198.51.100.9", "0.0.0.0/0", "10.1.0.0/16"}
	destIPVals    = []string{"10.0.0.2", "10.0.0.0/24", "2001:db8::2/128", "10.0.0.3"}
	portVals      = []string{"8080", "9080", "443"}
	hostVals      = []string{"admin.example.com", "*.example.com", "api.*", "*", "ADMIN.example.com", "web.foo.svc.cluster.local", "*.internal"}
	methodVals    = []string{"GET", "POST", "DELETE", "*", "P*"}
	pathVals      = []string{"/admin", "/api/*", "*.html", "*", "/api/{*}/items", "/api/v1/{**}", "/{*}/users", "/admin/{**}",
		"/api/v1/items/{*}", "/", "/api/{**}", "*/items"}
	headerCondVals = []string{"alice", "a*", "*b", "*", "prod", "staging", "curl*"}
	sniVals        = []string{"web.foo.svc.cluster.local", "*.example.com", "outbound_*", "*", "api.example.com"}
	policyNSs      = []string{rootNamespace, "foo", "bar"}
)

type gen struct {
	r    *rand.Rand
	seed int64
}

func (g *gen) pick(xs []string) string { return xs[g.r.IntN(len(xs))] }
func (g *gen) chance(p float64) bool   { return g.r.Float64() < p }

// some returns 1 or 2 distinct-ish values from xs.
func (g *gen) some(xs []string) []string {
	n := 1
	if g.chance(0.35) {
		n = 2
	}
	out := make([]string, 0, n)
	for len(out) < n {
		v := g.pick(xs)
		dup := false
		for _, o := range out {
			dup = dup || o == v
		}
		if !dup {
			out = append(out, v)
		}
	}
	return out
}

// policySet is the policies of a group of cases, as Istio objects.
type policySet struct {
	objs []*object
}

// object is one AuthorizationPolicy as Istio reads it.
type object struct {
	Namespace   string
	Name        string
	Annotations map[string]string
	Spec        *securityv1beta1.AuthorizationPolicy
}

func (g *gen) policies() *policySet {
	n := 1 + g.r.IntN(3)
	if g.chance(0.1) {
		n = 4
	}
	ps := &policySet{}
	for i := 0; i < n; i++ {
		o := &object{Namespace: g.pick(policyNSs), Name: fmt.Sprintf("p%d", i), Spec: &securityv1beta1.AuthorizationPolicy{}}
		switch x := g.r.Float64(); {
		case x < 0.5:
			o.Spec.Action = securityv1beta1.AuthorizationPolicy_ALLOW
		case x < 0.82:
			o.Spec.Action = securityv1beta1.AuthorizationPolicy_DENY
		default:
			o.Spec.Action = securityv1beta1.AuthorizationPolicy_AUDIT
		}
		if g.chance(0.15) {
			o.Annotations = map[string]string{"istio.io/dry-run": "true"}
		}
		if g.chance(0.45) {
			o.Spec.Selector = g.selector()
		}
		rules := 1 + g.r.IntN(2)
		switch x := g.r.Float64(); {
		case x < 0.05:
			rules = 0
		case x < 0.15:
			rules = 3
		}
		for j := 0; j < rules; j++ {
			o.Spec.Rules = append(o.Spec.Rules, g.rule())
		}
		ps.objs = append(ps.objs, o)
	}
	return ps
}

func (g *gen) selector() *typev1beta1.WorkloadSelector {
	switch g.r.IntN(5) {
	case 0:
		return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}}
	case 1:
		return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "api"}}
	case 2:
		return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"istio": "ingressgateway"}}
	case 3:
		return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "web", "version": "v1"}}
	}
	return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "nothing"}}
}

func (g *gen) rule() *securityv1beta1.Rule {
	r := &securityv1beta1.Rule{}
	if g.chance(0.03) {
		return r // an empty rule matches everything
	}
	for i, n := 0, g.count(); i < n; i++ {
		r.From = append(r.From, &securityv1beta1.Rule_From{Source: g.source()})
	}
	for i, n := 0, g.count(); i < n; i++ {
		r.To = append(r.To, &securityv1beta1.Rule_To{Operation: g.operation()})
	}
	for i, n := 0, g.count(); i < n; i++ {
		r.When = append(r.When, g.condition())
	}
	return r
}

// count is 0 (often), 1 (often) or 2.
func (g *gen) count() int {
	switch x := g.r.Float64(); {
	case x < 0.45:
		return 0
	case x < 0.85:
		return 1
	}
	return 2
}

// neg fills either the positive or the negated list (sometimes both).
func (g *gen) neg(pos, not *[]string, pool []string) {
	switch x := g.r.Float64(); {
	case x < 0.5:
		*pos = g.some(pool)
	case x < 0.9:
		*not = g.some(pool)
	default:
		*pos, *not = g.some(pool), g.some(pool)
	}
}

func (g *gen) source() *securityv1beta1.Source {
	s := &securityv1beta1.Source{}
	for n := 1 + g.r.IntN(2); n > 0; n-- {
		switch g.r.IntN(6) {
		case 0:
			if len(s.ServiceAccounts)+len(s.NotServiceAccounts) == 0 {
				g.neg(&s.Principals, &s.NotPrincipals, principalVals)
			}
		case 1:
			if len(s.ServiceAccounts)+len(s.NotServiceAccounts) == 0 {
				g.neg(&s.Namespaces, &s.NotNamespaces, namespaceVals)
			}
		case 2:
			if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) == 0 {
				g.neg(&s.ServiceAccounts, &s.NotServiceAccounts, saVals)
			}
		case 3:
			g.neg(&s.TrustDomains, &s.NotTrustDomains, tdVals)
		case 4:
			g.neg(&s.IpBlocks, &s.NotIpBlocks, cidrVals)
		case 5:
			g.neg(&s.RemoteIpBlocks, &s.NotRemoteIpBlocks, cidrVals)
		}
	}
	if isEmptySource(s) {
		g.neg(&s.IpBlocks, &s.NotIpBlocks, cidrVals)
	}
	return s
}

func isEmptySource(s *securityv1beta1.Source) bool {
	return len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces)+
		len(s.ServiceAccounts)+len(s.NotServiceAccounts)+len(s.TrustDomains)+len(s.NotTrustDomains)+
		len(s.IpBlocks)+len(s.NotIpBlocks)+len(s.RemoteIpBlocks)+len(s.NotRemoteIpBlocks) == 0
}

func (g *gen) operation() *securityv1beta1.Operation {
	o := &securityv1beta1.Operation{}
	for n := 1 + g.r.IntN(2); n > 0; n-- {
		switch g.r.IntN(4) {
		case 0:
			g.neg(&o.Hosts, &o.NotHosts, hostVals)
		case 1:
			g.neg(&o.Ports, &o.NotPorts, portVals)
		case 2:
			g.neg(&o.Methods, &o.NotMethods, methodVals)
		case 3:
			g.neg(&o.Paths, &o.NotPaths, pathVals)
		}
	}
	return o
}

func (g *gen) condition() *securityv1beta1.Condition {
	c := &securityv1beta1.Condition{}
	var pool []string
	switch g.r.IntN(8) {
	case 0:
		c.Key, pool = "request.headers["+g.pick([]string{"x-user", "X-Env", "user-agent"})+"]", headerCondVals
	case 1:
		c.Key, pool = "source.ip", cidrVals
	case 2:
		c.Key, pool = "remote.ip", cidrVals
	case 3:
		c.Key, pool = "source.namespace", namespaceVals
	case 4:
		c.Key, pool = "source.principal", principalVals
	case 5:
		c.Key, pool = "destination.ip", destIPVals
	case 6:
		c.Key, pool = "destination.port", portVals
	case 7:
		c.Key, pool = "connection.sni", sniVals
	}
	g.neg(&c.Values, &c.NotValues, pool)
	return c
}

func (g *gen) request() conformance.Request {
	w := workloads[g.r.IntN(len(workloads))]
	r := conformance.Request{Listener: w.listener, Dest: w.dest}
	r.Dest.IP = g.pick(destIPs)
	r.Dest.Port = destPorts[g.r.IntN(len(destPorts))]
	if !g.chance(0.3) {
		r.Principal = g.pick(peers)
	}
	r.PeerIP = g.pick(peerIPs)
	if g.chance(0.5) {
		r.Forwarded = g.pick(forwardedIPs)
	}
	if g.chance(0.5) {
		r.SNI = g.pick(snis)
	}
	if g.chance(0.2) {
		// A TCP connection carries no forwarded address.
		r.TCP, r.Forwarded = true, ""
		return r
	}
	r.Host = g.pick(hosts)
	r.Method = g.pick(methods)
	r.Path = g.pick(reqPaths) + g.pick(queries)
	for _, h := range headerNames {
		if g.chance(0.45) {
			if r.Headers == nil {
				r.Headers = map[string]string{}
			}
			r.Headers[h] = g.pick(headerVals)
		}
	}
	return r
}
