package mesh

import (
	"fmt"
	"sort"
	"strings"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// FromServiceEntry converts an Istio ServiceEntry. Only MESH_EXTERNAL
// entries declare external hosts; a MESH_INTERNAL entry is refused (mesh
// services come from Services), as is anything the egress gateway cannot
// originate TLS for. Each host of the entry becomes one ExternalService.
func FromServiceEntry(ns, name string, se *networkingv1alpha3.ServiceEntry) ([]*ExternalService, *Refusal) {
	obj := "ServiceEntry " + ns + "/" + name
	refuse := func(format string, args ...any) ([]*ExternalService, *Refusal) {
		return nil, &Refusal{Object: obj, Reason: fmt.Sprintf(format, args...)}
	}
	if se.GetLocation() != networkingv1alpha3.ServiceEntry_MESH_EXTERNAL {
		return refuse("only location MESH_EXTERNAL is supported")
	}
	if len(se.GetAddresses()) > 0 || len(se.GetEndpoints()) > 0 || se.GetWorkloadSelector() != nil || len(se.GetSubjectAltNames()) > 0 {
		return refuse("addresses, endpoints, workloadSelector and subjectAltNames are not supported; declare hosts and ports, resolved by DNS")
	}
	if r := se.GetResolution(); r != networkingv1alpha3.ServiceEntry_DNS && r != networkingv1alpha3.ServiceEntry_NONE {
		return refuse("resolution %s is not supported; use DNS", r)
	}
	var ports []ExternalPort
	for _, p := range se.GetPorts() {
		proto := Protocol(strings.ToUpper(p.GetProtocol()))
		if !proto.IsHTTP() {
			return refuse("port %d: protocol %q: the egress gateway originates TLS for HTTP ports only", p.GetNumber(), p.GetProtocol())
		}
		ports = append(ports, ExternalPort{Name: p.GetName(), Port: p.GetNumber(), Protocol: proto, TLSPort: p.GetTargetPort()})
	}
	var out []*ExternalService
	for _, h := range se.GetHosts() {
		if strings.Contains(h, "*") {
			return refuse("wildcard host %q: every external host must be declared by name", h)
		}
		out = append(out, &ExternalService{Namespace: ns, Name: name, Host: strings.ToLower(h), Ports: ports})
	}
	return out, nil
}

// CheckGateway returns the refusals of an Istio Gateway's servers: a
// server is honoured when its tls.mode is SIMPLE with a credentialName (an
// ingress) or ISTIO_MUTUAL (an egress); any other server is refused and
// skipped. The Kubernetes mesh source and the admission webhook both call
// it.
func CheckGateway(ns, name string, gw *networkingv1alpha3.Gateway) []Refusal {
	var out []Refusal
	for i, sv := range gw.GetServers() {
		if reason := checkServer(sv); reason != "" {
			out = append(out, Refusal{Object: "Gateway " + ns + "/" + name, Reason: fmt.Sprintf("servers[%d]: %s", i, reason)})
		}
	}
	return out
}

// GatewayServerOK reports whether CheckGateway honours a server.
func GatewayServerOK(sv *networkingv1alpha3.Server) bool { return checkServer(sv) == "" }

func checkServer(sv *networkingv1alpha3.Server) string {
	switch sv.GetTls().GetMode() {
	case networkingv1alpha3.ServerTLSSettings_SIMPLE:
		if sv.GetTls().GetCredentialName() == "" {
			return "only credentialName certificates are supported"
		}
		return ""
	case networkingv1alpha3.ServerTLSSettings_ISTIO_MUTUAL:
		return ""
	}
	if sv.GetTls() == nil {
		// The zero mode is PASSTHROUGH: do not name a mode nobody wrote.
		return "a server without tls is not supported; use tls.mode SIMPLE (ingress) or ISTIO_MUTUAL (egress)"
	}
	return fmt.Sprintf("tls.mode %s is not supported; use SIMPLE (ingress) or ISTIO_MUTUAL (egress)", sv.GetTls().GetMode())
}

// CheckPeerAuthentication refuses every mode but STRICT: trustmesh never
// lets plaintext between workloads, whatever the configuration says. It
// returns nil for STRICT (or UNSET, which inherits STRICT).
func CheckPeerAuthentication(ns, name string, pa *securityv1beta1.PeerAuthentication) *Refusal {
	ok := func(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
		switch m.GetMode() {
		case securityv1beta1.PeerAuthentication_MutualTLS_STRICT, securityv1beta1.PeerAuthentication_MutualTLS_UNSET:
			return true
		}
		return false
	}
	var bad []string
	if !ok(pa.GetMtls()) {
		bad = append(bad, "mtls.mode "+pa.GetMtls().GetMode().String())
	}
	for port, m := range pa.GetPortLevelMtls() {
		if !ok(m) {
			bad = append(bad, fmt.Sprintf("portLevelMtls[%d].mode %s", port, m.GetMode()))
		}
	}
	if len(bad) == 0 {
		return nil
	}
	sort.Strings(bad)
	return &Refusal{
		Object: "PeerAuthentication " + ns + "/" + name,
		Reason: strings.Join(bad, ", ") + " refused: trustmesh enforces STRICT mTLS only and keeps it in force",
	}
}
