package main

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/pkg/security/authz/builder"
	"istio.io/istio/pilot/pkg/security/trustdomain"
	"istio.io/istio/pkg/config/labels"

	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/test/envoyrbac"
)

// compiled is Istio's RBAC for one destination workload: the enforcing
// rules of each filter, in filter order, for HTTP and for TCP.
type compiled struct {
	http []*rbacv3.RBAC
	tcp  []*rbacv3.RBAC
}

// compile selects the policies that apply to the workload and builds its
// RBAC filters, as istiod's authz plugin does for an inbound listener or a
// gateway (pilot/pkg/networking/plugin/authz).
func compile(ps *policySet, w conformance.Workload) (*compiled, error) {
	aps := &model.AuthorizationPolicies{NamespaceToPolicies: map[string][]model.AuthorizationPolicy{}, RootNamespace: rootNamespace}
	for _, o := range ps.objs {
		aps.NamespaceToPolicies[o.Namespace] = append(aps.NamespaceToPolicies[o.Namespace], model.AuthorizationPolicy{
			Name: o.Name, Namespace: o.Namespace, Annotations: o.Annotations, Spec: o.Spec,
		})
	}
	sel := model.PolicyMatcherFor(w.Namespace, labels.Instance(w.Labels), false).WithRootNamespace(rootNamespace)
	b := builder.New(trustdomain.NewBundle("cluster.local", nil), nil, aps.ListAuthorizationPolicies(sel), builder.Option{})
	c := &compiled{}
	if b == nil {
		return c, nil // no policy applies: no RBAC filter
	}
	for _, f := range b.BuildHTTP() {
		cfg := &rbachttpv3.RBAC{}
		if err := f.GetTypedConfig().UnmarshalTo(cfg); err != nil {
			return nil, fmt.Errorf("HTTP filter %s: %w", f.GetName(), err)
		}
		c.http = append(c.http, cfg.GetRules())
	}
	for _, f := range b.BuildTCP() {
		cfg := &rbactcpv3.RBAC{}
		if err := f.GetTypedConfig().UnmarshalTo(cfg); err != nil {
			return nil, fmt.Errorf("TCP filter %s: %w", f.GetName(), err)
		}
		c.tcp = append(c.tcp, cfg.GetRules())
	}
	return c, nil
}

// decide runs the request through the filters in order: the first that
// denies decides. Shadow rules (dry-run) never enforce; LOG rules (AUDIT)
// always allow.
func (c *compiled) decide(r *conformance.Request, remoteIP string) (bool, []string, error) {
	er, err := envoyRequest(r, remoteIP)
	if err != nil {
		return false, nil, err
	}
	filters := c.http
	if r.TCP {
		filters = c.tcp
	}
	var matched []string
	allowed := true
	for _, rules := range filters {
		if rules == nil {
			continue
		}
		_, names, err := envoyrbac.Matched(rules, er)
		if err != nil {
			return false, nil, err
		}
		sort.Strings(names)
		for _, n := range names {
			matched = append(matched, strings.ToLower(rules.GetAction().String())+":"+n)
		}
		if !allowed {
			continue
		}
		if allowed, err = envoyrbac.Allows(rules, er); err != nil {
			return false, nil, err
		}
	}
	return allowed, matched, nil
}

// envoyRequest is what Envoy's RBAC filters see of the request.
func envoyRequest(r *conformance.Request, remoteIP string) (*envoyrbac.Request, error) {
	er := &envoyrbac.Request{HTTP: !r.TCP, Principal: r.Principal, DestPort: r.Dest.Port, SNI: r.SNI}
	var err error
	if er.DirectRemoteIP, err = netip.ParseAddr(r.PeerIP); err != nil {
		return nil, err
	}
	if er.RemoteIP, err = netip.ParseAddr(remoteIP); err != nil {
		return nil, err
	}
	if er.DestinationIP, err = netip.ParseAddr(r.Dest.IP); err != nil {
		return nil, err
	}
	if !r.TCP {
		er.Headers = map[string]string{":authority": r.Host, ":method": r.Method, ":path": r.Path}
		for k, v := range r.Headers {
			er.Headers[strings.ToLower(k)] = v
		}
	}
	return er, nil
}
