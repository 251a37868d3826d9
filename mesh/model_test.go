package mesh_test

import (
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func valid() *mesh.Mesh {
	w := &mesh.Workload{Namespace: "a", Name: "pod", ServiceAccount: "sa", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/sa")}
	return &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "a", Name: "web", Hostname: "web.a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}},
		Endpoints: []mesh.Endpoint{{Address: "10.0.0.1", Workload: w}},
	}}}
}

func TestValidate(t *testing.T) {
	cases := map[string]func(m *mesh.Mesh){
		"workload ID of another trust domain": func(m *mesh.Mesh) {
			m.Services[0].Endpoints[0].Workload.ID = spiffeid.RequireFromString("spiffe://other.example/ns/a/sa/sa")
		},
		"workload ID of another service account": func(m *mesh.Mesh) {
			m.Services[0].Endpoints[0].Workload.ID = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/admin")
		},
		"workload in another namespace": func(m *mesh.Mesh) { m.Services[0].Endpoints[0].Workload.Namespace = "b" },
		"service declared twice":        func(m *mesh.Mesh) { m.Services = append(m.Services, m.Services[0]) },
		"unknown protocol":              func(m *mesh.Mesh) { m.Services[0].Ports[0].Protocol = "UDP" },
		"port out of range":             func(m *mesh.Mesh) { m.Services[0].Ports[0].Port = 70000 },
		"bad endpoint address":          func(m *mesh.Mesh) { m.Services[0].Endpoints[0].Address = "web-0" },
		"endpoint port names no port":   func(m *mesh.Mesh) { m.Services[0].Endpoints[0].Ports = map[string]uint32{"nope": 1} },
		"external host is a mesh host": func(m *mesh.Mesh) {
			m.External = []*mesh.ExternalService{{Host: "web.a.svc.cluster.local", Ports: []mesh.ExternalPort{{Port: 80, Protocol: mesh.HTTP}}}}
		},
		"external wildcard host": func(m *mesh.Mesh) {
			m.External = []*mesh.ExternalService{{Host: "*.example.com", Ports: []mesh.ExternalPort{{Port: 80, Protocol: mesh.HTTP}}}}
		},
		"external TCP port": func(m *mesh.Mesh) {
			m.External = []*mesh.ExternalService{{Host: "db.example.com", Ports: []mesh.ExternalPort{{Port: 5432, Protocol: mesh.TCP}}}}
		},
		"egress gateway without its service": func(m *mesh.Mesh) {
			m.Gateways = []*mesh.Gateway{{Namespace: "a", Name: "eg", Kind: mesh.Egress, Selector: map[string]string{"x": "y"}, Service: "nope", Port: 1}}
		},
		"ingress route to an unknown service": func(m *mesh.Mesh) {
			m.Gateways = []*mesh.Gateway{{Namespace: "a", Name: "in", Kind: mesh.Ingress, Selector: map[string]string{"x": "y"},
				Servers: []mesh.Server{{Port: 443, Hosts: []string{"h"}, CredentialName: "c", Routes: []mesh.Route{{Host: "h", Service: "a/nope", Port: 80}}}}}}
		},
		"workload ID of another service account (Workloads)": func(m *mesh.Mesh) {
			m.Workloads = []*mesh.Workload{{Namespace: "a", Name: "client", ServiceAccount: "sa", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/admin")}}
		},
		"workload declared twice with other labels": func(m *mesh.Mesh) {
			w := *m.Services[0].Endpoints[0].Workload
			w.Labels = map[string]string{"istio": "ingressgateway"}
			m.Workloads = []*mesh.Workload{&w}
		},
		"gateway without selector": func(m *mesh.Mesh) {
			m.Gateways = []*mesh.Gateway{{Namespace: "a", Name: "in", Kind: mesh.Ingress}}
		},
	}
	if err := valid().Validate(td); err != nil {
		t.Fatalf("valid mesh: %v", err)
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			m := valid()
			mutate(m)
			if err := m.Validate(td); !errors.Is(err, mesh.ErrInvalid) {
				t.Fatalf("Validate() = %v, want ErrInvalid", err)
			}
		})
	}
}

// TestMayReadSecret: a gateway secret is readable only by the service
// accounts of the workloads its gateway selects, by the mesh's labels, in
// its own namespace.
func TestMayReadSecret(t *testing.T) {
	id := func(ns, sa string) spiffeid.ID { return spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa) }
	m := &mesh.Mesh{
		Workloads: []*mesh.Workload{
			{Namespace: "gw", Name: "ingress-0", ServiceAccount: "ingress", ID: id("gw", "ingress"), Labels: map[string]string{"istio": "ingressgateway"}},
			{Namespace: "gw", Name: "tools-0", ServiceAccount: "tools", ID: id("gw", "tools"), Labels: map[string]string{"app": "tools"}},
			{Namespace: "other", Name: "ingress-0", ServiceAccount: "ingress", ID: id("other", "ingress"), Labels: map[string]string{"istio": "ingressgateway"}},
		},
		Gateways: []*mesh.Gateway{{Namespace: "gw", Name: "in", Kind: mesh.Ingress, Selector: map[string]string{"istio": "ingressgateway"},
			Servers: []mesh.Server{{Port: 443, Hosts: []string{"h"}, CredentialName: "cert"}}}},
	}
	cases := []struct {
		ns, sa, name string
		want         bool
	}{
		{"gw", "ingress", "cert", true},
		{"gw", "tools", "cert", false},
		{"gw", "ingress", "other-cert", false},
		{"other", "ingress", "cert", false},
	}
	for _, tc := range cases {
		if got := m.MayReadSecret(tc.ns, tc.sa, tc.name); got != tc.want {
			t.Errorf("MayReadSecret(%s, %s, %s) = %t, want %t", tc.ns, tc.sa, tc.name, got, tc.want)
		}
	}
	if w := m.Workload("gw", "tools-0"); w == nil || w.ServiceAccount != "tools" {
		t.Fatalf("Workload(gw, tools-0) = %v: Workloads are not looked up", w)
	}
}
