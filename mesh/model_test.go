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
