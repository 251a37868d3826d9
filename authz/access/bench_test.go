package access_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

// bigMesh is n services of three workloads each, in n/5 namespaces, each
// with an HTTP and a TCP port.
func bigMesh(n int) *mesh.Mesh {
	m := &mesh.Mesh{}
	for i := range n {
		ns := fmt.Sprintf("ns%d", i/5)
		name := fmt.Sprintf("svc%d", i)
		s := &mesh.Service{Namespace: ns, Name: name, Hostname: name + "." + ns + ".svc.cluster.local",
			Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP, TargetPort: 8080}, {Name: "tcp", Port: 5000, Protocol: mesh.TCP}}}
		for j := range 3 {
			s.Endpoints = append(s.Endpoints, mesh.Endpoint{Address: fmt.Sprintf("10.%d.%d.%d", i/250, i%250, j+1), Workload: &mesh.Workload{
				Namespace: ns, Name: fmt.Sprintf("%s-%d", name, j), ServiceAccount: name,
				ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/" + ns + "/sa/" + name), Labels: map[string]string{"app": name}}})
		}
		m.Services = append(m.Services, s)
	}
	return m
}

// BenchmarkCompute is the access view of a mesh of 50 services (150
// workloads) under 40 policies, as the UI computes it on each change.
func BenchmarkCompute(b *testing.B) {
	m := bigMesh(50)
	g := &policyGen{r: rand.New(rand.NewPCG(1, 2))}
	var docs []string
	for i := range 40 {
		d := g.policy(i)
		d = strings.NewReplacer("namespace: web", fmt.Sprintf("namespace: ns%d", i%10), "namespace: db", fmt.Sprintf("namespace: ns%d", (i+3)%10),
			"app: front", fmt.Sprintf("app: svc%d", i), "app: api", fmt.Sprintf("app: svc%d", i+1)).Replace(d)
		docs = append(docs, d)
	}
	ps, err := policy.ParseYAML("bench", []byte(strings.Join(docs, "---\n")), "default")
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		mx, err := access.Compute(ps, m, access.Options{RootNamespace: root})
		if err != nil {
			b.Fatal(err)
		}
		if len(mx.Cells) != 50*50*2 {
			b.Fatalf("%d cells", len(mx.Cells))
		}
	}
}
