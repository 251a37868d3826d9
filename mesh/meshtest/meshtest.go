// Package meshtest is the contract every mesh.Source keeps: the same mesh,
// described in the source's own terms (mesh files, Kubernetes objects),
// yields the same model, and a change to it is reported by Watch and
// reaches the model.
//
// A source's test describes the contract's mesh (see Want) with a Writer
// and calls Run.
package meshtest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
)

// Version is a version of the contract's mesh.
type Version int

// The versions, in the order Run writes them.
const (
	// Initial is the mesh as Want describes it.
	Initial Version = iota
	// Relabelled adds the label version=v2 to the pod web-0.
	Relabelled
)

// Names are the namespaces the contract's mesh lives in, chosen by the
// backend (a shared apiserver needs fresh ones per run). The model is
// compared only within them.
type Names struct {
	App     string // the web service, its pod and the external host
	Gateway string // the ingress gateway, its pod and its TLS secret
}

// TrustDomain is the trust domain of the contract's SPIFFE IDs.
var TrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// Want is the model of version v of the contract's mesh:
//
//   - in App, Service web: port http 80 (HTTP), served on 8080, and port
//     grpc-api 7070 (GRPC), with one endpoint 10.1.0.5, the pod web-0 of
//     service account web, labelled app=web;
//   - in Gateway, the pod ingress-0 of service account ingress, labelled
//     istio=ingressgateway, serving no service;
//   - in Gateway, the ingress Gateway ingress selecting it: port 8443 for
//     host App.example.com with the TLS Secret shop-cert (certificate
//     "CERT", key "KEY"), routing / to web's port 80;
//   - in App, the external service payments for the host
//     api.App.example: port http 80 (HTTP), TLS originated to 443.
//
// Host names carry App so that runs in fresh namespaces of one apiserver
// do not collide.
func Want(v Version, n Names) *mesh.Mesh {
	webLabels := map[string]string{"app": "web"}
	if v >= Relabelled {
		webLabels["version"] = "v2"
	}
	web := &mesh.Workload{Namespace: n.App, Name: "web-0", ServiceAccount: "web",
		ID: spiffeid.RequireFromSegments(TrustDomain, "ns", n.App, "sa", "web"), Labels: webLabels}
	ingress := &mesh.Workload{Namespace: n.Gateway, Name: "ingress-0", ServiceAccount: "ingress",
		ID:     spiffeid.RequireFromSegments(TrustDomain, "ns", n.Gateway, "sa", "ingress"),
		Labels: map[string]string{"istio": "ingressgateway"}}
	site, api := n.App+".example.com", "api."+n.App+".example"
	return &mesh.Mesh{
		Services: []*mesh.Service{{
			Namespace: n.App, Name: "web", Hostname: "web." + n.App + ".svc.cluster.local",
			Ports:     []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}, {Name: "grpc-api", Port: 7070, Protocol: mesh.GRPC}},
			Endpoints: []mesh.Endpoint{{Address: "10.1.0.5", Workload: web, Ports: map[string]uint32{"http": 8080}}},
		}},
		Workloads: []*mesh.Workload{ingress},
		Gateways: []*mesh.Gateway{{
			Namespace: n.Gateway, Name: "ingress", Kind: mesh.Ingress, Selector: map[string]string{"istio": "ingressgateway"},
			Servers: []mesh.Server{{Port: 8443, Hosts: []string{site}, CredentialName: "shop-cert",
				Routes: []mesh.Route{{Host: site, PathPrefix: "/", Service: n.App + "/web", Port: 80}}}},
		}},
		Secrets: []*mesh.Secret{{Namespace: n.Gateway, Name: "shop-cert", CertPEM: []byte("CERT"), KeyPEM: []byte("KEY")}},
		External: []*mesh.ExternalService{{Namespace: n.App, Name: "payments", Host: api,
			Ports: []mesh.ExternalPort{{Name: "http", Port: 80, Protocol: mesh.HTTP, TLSPort: 443}}}},
	}
}

// Writer makes a backend describe version v of the contract's mesh, in
// namespaces n, replacing what it described before.
type Writer func(t *testing.T, v Version, n Names)

// Run checks src against the contract: it writes Initial, starts src's
// Watch, and waits for the model to be Want(Initial); then it writes
// Relabelled and requires Watch to report a change and the model to become
// Want(Relabelled). Finally the watch must end cleanly with ctx.
func Run(t *testing.T, src mesh.Source, n Names, write Writer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	write(t, Initial, n)
	changes := make(chan struct{}, 1)
	wctx, wcancel := context.WithCancel(ctx)
	done, err := src.Watch(wctx, func() {
		select {
		case changes <- struct{}{}:
		default:
		}
	})
	if err != nil {
		wcancel()
		t.Fatal(err)
	}
	defer func() {
		wcancel()
		if err := <-done; err != nil {
			t.Errorf("the watch ended with %v, want nil", err)
		}
	}()
	await(ctx, t, src, changes, Want(Initial, n), n)

	drain(changes)
	write(t, Relabelled, n)
	select {
	case <-changes:
	case <-ctx.Done():
		t.Fatal("Watch reported no change after the mesh changed")
	}
	await(ctx, t, src, changes, Want(Relabelled, n), n)
}

// await waits, change by change, until src's model matches want.
func await(ctx context.Context, t *testing.T, src mesh.Source, changes <-chan struct{}, want *mesh.Mesh, n Names) {
	t.Helper()
	wantSum := Summary(want, n)
	var got []string
	for {
		m, err := src.Mesh()
		if err == nil {
			if err := m.Validate(TrustDomain); err != nil {
				t.Fatalf("the model does not validate: %v", err)
			}
			if got = Summary(m, n); slices.Equal(got, wantSum) {
				return
			}
		}
		select {
		case <-changes:
		case <-time.After(time.Second): // a source may settle without a further event
		case <-ctx.Done():
			t.Fatalf("the model never became the contract's (err %v):\n got:\n\t%s\nwant:\n\t%s",
				err, strings.Join(got, "\n\t"), strings.Join(wantSum, "\n\t"))
		}
	}
}

func drain(c <-chan struct{}) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

// Summary renders what the contract covers of m, within the namespaces n,
// as sorted lines: services with their ports and endpoints (address,
// workload, the port each serves on), every workload the mesh knows (pod,
// service account, SPIFFE ID, labels), gateways with their servers and
// routes, their TLS secrets, and external hosts. A Service's cluster IP is
// left out: Kubernetes allocates it.
func Summary(m *mesh.Mesh, n Names) []string {
	in := func(ns string) bool { return ns == n.App || ns == n.Gateway }
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	for _, s := range m.Services {
		if !in(s.Namespace) {
			continue
		}
		add("service %s host=%s", s.Key(), s.Hostname)
		for _, p := range s.Ports {
			add("service %s port %s %d %s", s.Key(), p.Name, p.Port, p.Protocol)
			for _, e := range s.Endpoints {
				add("service %s port %s endpoint %s pod=%s serves-on=%d", s.Key(), p.Name, e.Address, e.Workload.Key(), e.TargetPort(p))
			}
		}
	}
	for _, w := range m.AllWorkloads() {
		if in(w.Namespace) {
			add("workload %s sa=%s id=%s labels=%s", w.Key(), w.ServiceAccount, w.ID, labels(w.Labels))
		}
	}
	for _, g := range m.Gateways {
		if !in(g.Namespace) {
			continue
		}
		add("gateway %s kind=%s selector=%s service=%s port=%d", g.Key(), g.Kind, labels(g.Selector), g.Service, g.Port)
		for _, s := range g.Servers {
			add("gateway %s server %d hosts=%v credential=%s", g.Key(), s.Port, s.Hosts, s.CredentialName)
			for _, r := range s.Routes {
				add("gateway %s server %d route %s%s -> %s:%d", g.Key(), s.Port, r.Host, r.PathPrefix, r.Service, r.Port)
			}
		}
	}
	for _, s := range m.Secrets {
		if in(s.Namespace) {
			add("secret %s cert=%q key=%q", s.Key(), s.CertPEM, s.KeyPEM)
		}
	}
	for _, x := range m.External {
		if !in(x.Namespace) {
			continue
		}
		for _, p := range x.Ports {
			add("external %s port %s %d %s tls-to=%d", x.Host, p.Name, p.Port, p.Protocol, p.Target())
		}
	}
	slices.Sort(out)
	return out
}

func labels(l map[string]string) string {
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(l)) {
		kv = append(kv, k+"="+l[k])
	}
	return strings.Join(kv, ",")
}
