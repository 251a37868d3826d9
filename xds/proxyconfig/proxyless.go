package proxyconfig

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/rbac"
	"github.com/trustmesh/trustmesh/mesh"
)

// ErrProxyless marks a policy grpc-go cannot enforce.
var ErrProxyless = errors.New("proxyconfig: policy cannot be enforced by proxyless gRPC")

// CheckProxyless refuses what grpc-go's RBAC cannot enforce as the authz
// engine would: CUSTOM policies (grpc-go has no ext_authz), connection.sni
// (grpc-go matches requested_server_name against ""), and headers grpc-go
// refuses to match (:scheme, grpc-*).
func CheckProxyless(p *policy.Policy) error {
	if p.Action == policy.Custom {
		return fmt.Errorf("%w: %s: CUSTOM needs ext_authz, which grpc-go does not have", ErrProxyless, p.Key())
	}
	for _, r := range p.Rules {
		for _, ms := range [][]policy.Match{r.From, r.To, {r.When}} {
			for _, m := range ms {
				for _, f := range m {
					switch {
					case f.Attr == policy.SNI:
						return fmt.Errorf("%w: %s: %s: connection.sni is not available to grpc-go", ErrProxyless, p.Key(), f.Name)
					case f.Attr == policy.Header && (f.HeaderName == ":scheme" || strings.HasPrefix(f.HeaderName, "grpc-")):
						return fmt.Errorf("%w: %s: %s: grpc-go does not match header %q", ErrProxyless, p.Key(), f.Name, f.HeaderName)
					}
				}
			}
		}
	}
	return nil
}

// ProxylessRBAC is the chain of RBAC filters of a proxyless server: the
// trust-domain check (grpc-go servers refuse SAN matchers), then the DENY
// and ALLOW policies. A policy grpc-go cannot enforce makes the chain deny
// everything, with the reason, rather than enforce less than the policy
// says.
func (b *Builder) ProxylessRBAC(ns string, labels map[string]string) ([]*rbacv3.RBAC, error) {
	chain := []*rbacv3.RBAC{{Rules: &rbacconfigv3.RBAC{
		Action: rbacconfigv3.RBAC_DENY,
		Policies: map[string]*rbacconfigv3.Policy{"trustmesh-trust-domain": {
			Permissions: []*rbacconfigv3.Permission{{Rule: &rbacconfigv3.Permission_Any{Any: true}}},
			Principals: []*rbacconfigv3.Principal{{Identifier: &rbacconfigv3.Principal_NotId{NotId: &rbacconfigv3.Principal{
				Identifier: &rbacconfigv3.Principal_Authenticated_{Authenticated: &rbacconfigv3.Principal_Authenticated{
					PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{
						Regex: "^" + regexp.QuoteMeta(b.cfg.TrustDomain.IDString()) + "/.+$",
					}}},
				}},
			}}}},
		}},
	}}}
	ps := policy.Applicable(b.policies, b.cfg.RootNamespace, ns, labels)
	var errs []error
	for _, p := range ps {
		if err := CheckProxyless(p); err != nil {
			errs = append(errs, err)
		}
	}
	var f *rbac.Filters
	if len(errs) == 0 {
		var err error
		if f, err = rbac.Build(ps, false); err != nil {
			errs = append(errs, fmt.Errorf("%w: %w", ErrProxyless, err))
		}
	}
	if len(errs) > 0 {
		// Fail closed: an ALLOW filter with no policy denies every request.
		return append(chain, &rbacv3.RBAC{Rules: &rbacconfigv3.RBAC{Action: rbacconfigv3.RBAC_ALLOW}}), errors.Join(errs...)
	}
	if f.Deny != nil {
		chain = append(chain, &rbacv3.RBAC{Rules: f.Deny})
	}
	if f.Allow != nil {
		chain = append(chain, &rbacv3.RBAC{Rules: f.Allow})
	}
	return chain, nil
}

func providerInstance(cert string) *tlsv3.CertificateProviderPluginInstance {
	return &tlsv3.CertificateProviderPluginInstance{InstanceName: ProxylessCertProvider, CertificateName: cert}
}

// grpcShared is what every proxyless client gets: a listener per service
// port (the xds:/// target HOST:PORT), and mTLS clusters checking the
// workloads' SPIFFE IDs, with certificates from the file_watcher provider.
func (b *Builder) grpcShared() *Resources {
	b.grpcOnce.Do(func() {
		r := &Resources{}
		for _, s := range b.mesh.Services {
			if len(s.Endpoints) == 0 {
				continue
			}
			if viaHBONE(s) {
				// grpc-go speaks neither HBONE nor Envoy's internal
				// listeners, and a node proxy accepts nothing else.
				r.Warnings = append(r.Warnings, fmt.Sprintf("service %s has an ambient endpoint, reached only over HBONE, which proxyless gRPC cannot speak; left out", s.Key()))
				continue
			}
			ids := workloadIDs(s)
			sans := make([]*matcherv3.StringMatcher, 0, len(ids))
			for _, id := range ids {
				sans = append(sans, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
			}
			for _, p := range s.Ports {
				name := OutboundCluster(p.Port, s.Hostname)
				c := edsCluster(name)
				c.TransportSocket = &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{
					CommonTlsContext: &tlsv3.CommonTlsContext{
						TlsCertificateProviderInstance: providerInstance(SecretDefault),
						ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
							CaCertificateProviderInstance: providerInstance(SecretRootCA),
							MatchSubjectAltNames:          sans,
						}},
					},
				})}}
				r.Clusters = append(r.Clusters, c)
				r.Endpoints = append(r.Endpoints, endpoints(name, s, p))
				target := fmt.Sprintf("%s:%d", s.Hostname, p.Port)
				r.Listeners = append(r.Listeners, &listenerv3.Listener{
					Name: target,
					ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(&hcmv3.HttpConnectionManager{
						StatPrefix: target,
						RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
							Name: target,
							VirtualHosts: []*routev3.VirtualHost{{
								Name: target, Domains: []string{target, s.Hostname},
								Routes: []*routev3.Route{{
									Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: ""}},
									Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: name}}},
								}},
							}},
						}},
						HttpFilters: []*hcmv3.HttpFilter{routerFilter()},
					})},
				})
			}
		}
		b.grpc = r
	})
	return b.grpc
}

// buildProxyless adds the workload's server listeners to the shared client
// side. grpc-go asks for its server listener by the address it listens on,
// so there is one per endpoint address and port, and per wildcard address.
func (b *Builder) buildProxyless(n *Node, w *mesh.Workload, labels map[string]string) *Resources {
	shared := b.grpcShared()
	r := &Resources{
		Listeners: append([]*listenerv3.Listener(nil), shared.Listeners...),
		Clusters:  shared.Clusters,
		Endpoints: shared.Endpoints,
	}
	chain, err := b.ProxylessRBAC(w.Namespace, labels)
	if err != nil {
		r.Refusals = append(r.Refusals, fmt.Sprintf("denying every request to %s: %v", w.Key(), err))
	}
	filters := make([]*hcmv3.HttpFilter, 0, len(chain)+1)
	for i, c := range chain {
		filters = append(filters, &hcmv3.HttpFilter{Name: fmt.Sprintf("envoy.filters.http.rbac.%d", i), ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(c)}})
	}
	filters = append(filters, routerFilter())
	seen := map[string]bool{}
	for _, s := range b.mesh.Services {
		for _, e := range s.Endpoints {
			if e.Workload.Key() != w.Key() {
				continue
			}
			for _, p := range s.Ports {
				port := e.TargetPort(p)
				for _, addr := range []string{e.Address, "0.0.0.0", "[::]"} {
					hostport := fmt.Sprintf("%s:%d", addr, port)
					if seen[hostport] {
						continue
					}
					seen[hostport] = true
					r.Listeners = append(r.Listeners, b.proxylessServer(hostport, strings.Trim(addr, "[]"), port, filters))
				}
			}
		}
	}
	return r
}

func (b *Builder) proxylessServer(hostport, addr string, port uint32, filters []*hcmv3.HttpFilter) *listenerv3.Listener {
	name := ProxylessInboundPrefix + hostport
	return &listenerv3.Listener{
		Name:             name,
		Address:          socketAddress(addr, port),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		FilterChains: []*listenerv3.FilterChain{{
			Name: name,
			TransportSocket: &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.DownstreamTlsContext{
				RequireClientCertificate: wrapperspb.Bool(true),
				CommonTlsContext: &tlsv3.CommonTlsContext{
					TlsCertificateProviderInstance: providerInstance(SecretDefault),
					ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
						CaCertificateProviderInstance: providerInstance(SecretRootCA),
					}},
				},
			})}},
			Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&hcmv3.HttpConnectionManager{
				StatPrefix: name,
				RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
					Name: name,
					VirtualHosts: []*routev3.VirtualHost{{
						Name: "inbound", Domains: []string{"*"},
						Routes: []*routev3.Route{{
							Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
							Action: &routev3.Route_NonForwardingAction{NonForwardingAction: &routev3.NonForwardingAction{}},
						}},
					}},
				}},
				HttpFilters: filters,
			})}}},
		}},
	}
}
