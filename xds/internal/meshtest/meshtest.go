// Package meshtest generates random meshes and policies for the xds
// tests: services with random ports and protocols, endpoints, ingress and
// egress gateways with their secrets, external hosts and
// AuthorizationPolicies.
package meshtest

import (
	"fmt"
	"math/rand/v2"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	structpb "google.golang.org/protobuf/types/known/structpb"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

var protocols = []mesh.Protocol{mesh.HTTP, mesh.HTTP2, mesh.GRPC, mesh.TCP}

// Random returns a valid random mesh in trust domain td.
func Random(r *rand.Rand, td spiffeid.TrustDomain) *mesh.Mesh {
	m := &mesh.Mesh{}
	namespaces := []string{"ns-a", "ns-b", "ns-c"}
	var workloads []*mesh.Workload
	for i := range 1 + r.IntN(4) {
		ns := namespaces[r.IntN(len(namespaces))]
		sa := fmt.Sprintf("sa-%d", r.IntN(3))
		workloads = append(workloads, &mesh.Workload{
			Namespace: ns, Name: fmt.Sprintf("pod-%d", i), ServiceAccount: sa,
			ID:     spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa),
			Labels: map[string]string{"app": fmt.Sprintf("app-%d", r.IntN(3))},
		})
	}
	for i := range 1 + r.IntN(6) {
		ns := namespaces[r.IntN(len(namespaces))]
		s := &mesh.Service{Namespace: ns, Name: fmt.Sprintf("svc-%d", i)}
		s.Hostname = fmt.Sprintf("%s.%s.svc.cluster.local", s.Name, ns)
		if r.IntN(2) == 0 {
			s.Address = fmt.Sprintf("10.96.0.%d", 10+i)
		}
		used := map[uint32]bool{}
		for j := range 1 + r.IntN(3) {
			port := []uint32{80, 443, 8080, 9080, 5432, 7070, 15001}[r.IntN(7)]
			if used[port] {
				continue
			}
			used[port] = true
			p := mesh.Port{Name: fmt.Sprintf("p%d", j), Port: port, Protocol: protocols[r.IntN(len(protocols))]}
			if r.IntN(2) == 0 {
				p.TargetPort = 9000 + uint32(r.IntN(20))
			}
			s.Ports = append(s.Ports, p)
		}
		for _, w := range workloads {
			if w.Namespace == ns && r.IntN(3) > 0 {
				s.Endpoints = append(s.Endpoints, mesh.Endpoint{Address: fmt.Sprintf("10.0.%d.%d", i, r.IntN(250)+1), Workload: w})
			}
		}
		m.Services = append(m.Services, s)
	}
	// An egress gateway with its service, and external hosts.
	if r.IntN(2) == 0 {
		gw := &mesh.Workload{Namespace: "istio-system", Name: "egress-0", ServiceAccount: "egress",
			ID: spiffeid.RequireFromSegments(td, "ns", "istio-system", "sa", "egress"), Labels: map[string]string{"istio": "egressgateway"}}
		m.Services = append(m.Services, &mesh.Service{
			Namespace: "istio-system", Name: "egress", Hostname: "egress.istio-system.svc.cluster.local",
			Ports:     []mesh.Port{{Name: "mtls", Port: 15443, Protocol: mesh.HTTP, TargetPort: 8443}},
			Endpoints: []mesh.Endpoint{{Address: "10.1.0.1", Workload: gw}},
		})
		m.Gateways = append(m.Gateways, &mesh.Gateway{Namespace: "istio-system", Name: "egress", Kind: mesh.Egress,
			Selector: map[string]string{"istio": "egressgateway"}, Service: "egress", Port: 15443})
		for i := range 1 + r.IntN(3) {
			x := &mesh.ExternalService{Namespace: "ns-a", Name: fmt.Sprintf("ext-%d", i), Host: fmt.Sprintf("api%d.example.com", i),
				Ports: []mesh.ExternalPort{{Name: "http", Port: 80, Protocol: mesh.HTTP, TLSPort: 443}}}
			if r.IntN(2) == 0 {
				x.CAFile = "/etc/example-ca.pem"
			}
			m.External = append(m.External, x)
		}
	}
	// An ingress gateway routing to HTTP ports, with or without its secret.
	if r.IntN(2) == 0 {
		gw := &mesh.Workload{Namespace: "istio-system", Name: "ingress-0", ServiceAccount: "ingress",
			ID: spiffeid.RequireFromSegments(td, "ns", "istio-system", "sa", "ingress"), Labels: map[string]string{"istio": "ingressgateway"}}
		m.Services = append(m.Services, &mesh.Service{
			Namespace: "istio-system", Name: "ingress", Hostname: "ingress.istio-system.svc.cluster.local",
			Ports:     []mesh.Port{{Name: "https", Port: 443, Protocol: mesh.HTTP, TargetPort: 8443}},
			Endpoints: []mesh.Endpoint{{Address: "10.1.0.2", Workload: gw}},
		})
		g := &mesh.Gateway{Namespace: "istio-system", Name: "ingress", Kind: mesh.Ingress, Selector: map[string]string{"istio": "ingressgateway"}}
		for i, s := range m.Services {
			for _, p := range s.Ports {
				if p.Protocol.IsHTTP() && s.Namespace != "istio-system" && r.IntN(2) == 0 {
					host := fmt.Sprintf("www%d.example.com", i)
					g.Servers = append(g.Servers, mesh.Server{Port: 8443, Hosts: []string{host}, CredentialName: "cert-" + fmt.Sprint(i%2),
						Routes: []mesh.Route{{Host: host, Service: s.Key(), Port: p.Port}}})
					break
				}
			}
		}
		m.Gateways = append(m.Gateways, g)
		m.Secrets = append(m.Secrets, &mesh.Secret{Namespace: "istio-system", Name: "cert-0", CertPEM: []byte("CERT"), KeyPEM: []byte("KEY")})
		if r.IntN(2) == 0 {
			// A secret of the same name in another namespace must never be
			// served to this gateway.
			m.Secrets = append(m.Secrets, &mesh.Secret{Namespace: "ns-a", Name: "cert-1", CertPEM: []byte("OTHER"), KeyPEM: []byte("OTHER")})
		}
	}
	m.Sort()
	return m
}

// policyTemplates are AuthorizationPolicy specs; %s is a namespace.
var policyTemplates = []string{
	`{"action":"ALLOW","rules":[{"from":[{"source":{"principals":["cluster.local/ns/%s/sa/sa-0"]}}]}]}`,
	`{"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin","/admin/*"]}}]}]}`,
	`{"selector":{"matchLabels":{"app":"app-1"}},"action":"ALLOW","rules":[{"to":[{"operation":{"methods":["GET"]}}]}]}`,
	`{"action":"ALLOW","rules":[{"when":[{"key":"connection.sni","values":["x.example.com"]}]}]}`,
	`{"action":"CUSTOM","provider":{"name":"rego:envoy/authz/allow"},"rules":[{}]}`,
	`{"action":"DENY","rules":[{"from":[{"source":{"notNamespaces":["%s"]}}]}]}`,
	`{}`,
}

// RandomPolicies returns up to n policies over the namespaces of m and the
// root namespace.
func RandomPolicies(r *rand.Rand, n int) []*policy.Policy {
	var out []*policy.Policy
	namespaces := []string{"ns-a", "ns-b", "ns-c", "istio-system"}
	for i := range r.IntN(n + 1) {
		ns := namespaces[r.IntN(len(namespaces))]
		tmpl := policyTemplates[r.IntN(len(policyTemplates))]
		spec := tmpl
		if strings.Contains(tmpl, "%s") {
			spec = fmt.Sprintf(tmpl, ns)
		}
		doc := fmt.Sprintf("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p-%d, namespace: %s}\nspec: %s\n", i, ns, spec)
		ps, err := policy.ParseYAML("random", []byte(doc), "default")
		if err != nil {
			panic(err)
		}
		out = append(out, ps...)
	}
	return out
}

// Node returns an xDS node for a workload, as its proxy would send it.
func Node(typ, ip string, w *mesh.Workload, proxyless bool) *corev3.Node {
	labels := map[string]any{}
	for k, v := range w.Labels {
		labels[k] = v
	}
	md := map[string]any{"SERVICE_ACCOUNT": w.ServiceAccount, "NAMESPACE": w.Namespace, "LABELS": labels}
	if proxyless {
		md["GENERATOR"] = "grpc"
	}
	s, err := structpb.NewStruct(md)
	if err != nil {
		panic(err)
	}
	return &corev3.Node{
		Id:       fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", typ, ip, w.Name, w.Namespace, w.Namespace),
		Metadata: s,
	}
}

// Workloads lists the distinct workloads of m.
func Workloads(m *mesh.Mesh) []*mesh.Workload { return m.AllWorkloads() }
