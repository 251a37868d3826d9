package xds_test

import (
	"context"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// gatewayMesh is an ingress gateway with its TLS secret, a bystander pod
// in the gateway's namespace under another service account, and a backend.
func gatewayMesh() (m *mesh.Mesh, gw, bystander *mesh.Workload) {
	id := func(ns, sa string) spiffeid.ID { return spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa) }
	gw = &mesh.Workload{Namespace: "istio-system", Name: "ingress-0", ServiceAccount: "ingress", ID: id("istio-system", "ingress"),
		Labels: map[string]string{"istio": "ingressgateway"}}
	bystander = &mesh.Workload{Namespace: "istio-system", Name: "tools-0", ServiceAccount: "attacker", ID: id("istio-system", "attacker"),
		Labels: map[string]string{"app": "tools"}}
	backend := &mesh.Workload{Namespace: "ns-a", Name: "web-0", ServiceAccount: "web", ID: id("ns-a", "web"), Labels: map[string]string{"app": "web"}}
	m = &mesh.Mesh{
		Services: []*mesh.Service{
			{Namespace: "istio-system", Name: "ingress", Hostname: "ingress.istio-system.svc.cluster.local",
				Ports: []mesh.Port{{Name: "https", Port: 443, Protocol: mesh.HTTP, TargetPort: 8443}}, Endpoints: []mesh.Endpoint{{Address: "10.1.0.2", Workload: gw}}},
			{Namespace: "istio-system", Name: "tools", Hostname: "tools.istio-system.svc.cluster.local",
				Ports: []mesh.Port{{Name: "http", Port: 8080, Protocol: mesh.HTTP}}, Endpoints: []mesh.Endpoint{{Address: "10.1.0.3", Workload: bystander}}},
			{Namespace: "ns-a", Name: "web", Hostname: "web.ns-a.svc.cluster.local",
				Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}}, Endpoints: []mesh.Endpoint{{Address: "10.0.0.1", Workload: backend}}},
		},
		Gateways: []*mesh.Gateway{{Namespace: "istio-system", Name: "ingress", Kind: mesh.Ingress, Selector: map[string]string{"istio": "ingressgateway"},
			Servers: []mesh.Server{{Port: 8443, Hosts: []string{"www.example.com"}, CredentialName: "www-cert",
				Routes: []mesh.Route{{Host: "www.example.com", Service: "ns-a/web", Port: 80}}}}}},
		Secrets: []*mesh.Secret{{Namespace: "istio-system", Name: "www-cert", CertPEM: []byte("CERT"), KeyPEM: []byte("GATEWAY PRIVATE KEY")}},
	}
	m.Sort()
	return m, gw, bystander
}

// askSecret opens a state-of-the-world stream as node and asks for the
// gateway's secret by name, as a router's SDS would. It returns the
// secrets received before the stream is refused or goes quiet.
func askSecret(t *testing.T, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node) ([]*tlsv3.Secret, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := c.StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	_ = s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.SecretType,
		ResourceNames: []string{proxyconfig.GatewaySecretName("istio-system", "www-cert")}})
	resp, err := s.Recv()
	if status.Code(err) == codes.DeadlineExceeded {
		return nil, nil // nothing to send: no secret
	}
	if err != nil {
		return nil, err
	}
	var out []*tlsv3.Secret
	for _, a := range resp.GetResources() {
		sec := &tlsv3.Secret{}
		if err := a.UnmarshalTo(sec); err != nil {
			t.Fatal(err)
		}
		out = append(out, sec)
	}
	return out, nil
}

// TestGatewaySecretsOnlyToTheGateway is the attack of issue 10 §4: a
// certificate for another service account of the gateway's namespace
// claims a router node, for a pod the mesh does not know or for a pod it
// knows that the gateway does not select, with the gateway's labels. It
// must never receive the gateway's private key. Only the gateway's own
// workload gets it.
func TestGatewaySecretsOnlyToTheGateway(t *testing.T) {
	m, gw, bystander := gatewayMesh()
	e := start(t, m, nil)
	attacker := e.mint(bystander.ID)
	gwLabels := map[string]string{"istio": "ingressgateway"}
	cases := []struct {
		name string
		cert *workloadCert
		node *corev3.Node
		want codes.Code // OK: the stream is served
		key  bool       // the private key is received
	}{
		{"unknown pod with the gateway's labels", attacker,
			meshtest.Node("router", "10.9.9.9", &mesh.Workload{Namespace: "istio-system", Name: "evil-0", ServiceAccount: "attacker", Labels: gwLabels}, false),
			codes.PermissionDenied, false},
		{"known pod claiming the gateway's labels", attacker,
			meshtest.Node("router", "10.9.9.9", &mesh.Workload{Namespace: "istio-system", Name: bystander.Name, ServiceAccount: "attacker", Labels: gwLabels}, false),
			codes.OK, false},
		{"the gateway's pod under another service account", attacker,
			meshtest.Node("router", "10.1.0.2", &mesh.Workload{Namespace: "istio-system", Name: gw.Name, ServiceAccount: "attacker", Labels: gwLabels}, false),
			codes.PermissionDenied, false},
		{"the gateway itself", e.mint(gw.ID), meshtest.Node("router", "10.1.0.2", gw, false), codes.OK, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			secrets, err := askSecret(t, e.dialADS(tc.cert), tc.node)
			gotKey := false
			for _, s := range secrets {
				if string(s.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) == "GATEWAY PRIVATE KEY" {
					gotKey = true
				}
			}
			if gotKey != tc.key {
				t.Fatalf("received the gateway's private key = %t, want %t", gotKey, tc.key)
			}
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code = %s (%v), want %s", got, err, tc.want)
			}
		})
	}
}
