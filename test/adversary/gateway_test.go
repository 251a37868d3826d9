package adversary

import (
	"bytes"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestGatewaySecretsStayWithTheGateway (class 4): a certificate for another
// service account of the gateway's namespace claims a router node with the
// gateway's labels and never receives the gateway's private key or its
// listeners; nodes the mesh does not know are refused.
func TestGatewaySecretsStayWithTheGateway(t *testing.T) {
	s := shared(t)
	attacker := s.enrol(t, attackerID)
	gwLabels := map[string]string{"istio": "ingressgateway"}
	leaks := func(resources []*anypb.Any) []string {
		var out []string
		for _, a := range resources {
			if bytes.Contains(a.GetValue(), []byte("www-cert")) || bytes.Contains(a.GetValue(), gatewayKeyPEM) {
				out = append(out, a.GetTypeUrl())
			}
			sec := &tlsv3.Secret{}
			if a.UnmarshalTo(sec) == nil && len(sec.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) > 0 {
				out = append(out, "private key of "+sec.GetName())
			}
		}
		return out
	}
	cases := []struct {
		name string
		node *corev3.Node
		// refused: the stream must end with PermissionDenied.
		refused bool
	}{
		{"unknown pod with the gateway's labels", node("router", "10.9.9.9", "evil-0", "istio-system", "attacker", gwLabels), true},
		{"the attacker's own pod as a router with the gateway's labels", node("router", "10.0.9.9", "tools-0", "istio-system", "attacker", gwLabels), false},
		{"the gateway's pod under the attacker's service account", node("router", gatewayAddr, "ingress-0", "istio-system", "attacker", gwLabels), true},
		{"unknown sidecar pod", sidecarNode("ghost-0", "istio-system", "attacker"), true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, ask := range []struct {
				delta bool
				typ   string
				names []string
			}{{false, secretType, []string{gatewaySecret}}, {false, listenerType, nil}, {true, secretType, []string{gatewaySecret}}, {true, listenerType, nil}} {
				what := map[bool]string{false: "state of the world ", true: "delta "}[ask.delta] + ask.typ
				resources, err := fetch(t, s, attacker, tc.node, ask.delta, ask.typ, ask.names, 3*time.Second)
				if tc.refused && status.Code(err) != codes.PermissionDenied {
					t.Errorf("%s: stream %v, want PermissionDenied", what, err)
				}
				if !tc.refused && err != nil {
					t.Errorf("%s: %v", what, err)
				}
				if l := leaks(resources); len(l) > 0 {
					t.Errorf("%s: the attacker received the gateway's %v", what, l)
				}
			}
		})
	}
	t.Run("control: the gateway gets its key", func(t *testing.T) {
		gw := s.enrol(t, gatewayID)
		resources, err := fetch(t, s, gw, node("router", gatewayAddr, "ingress-0", "istio-system", "istio-ingressgateway", gwLabels),
			false, secretType, []string{gatewaySecret}, 20*time.Second)
		if err != nil || len(leaks(resources)) == 0 {
			t.Fatalf("the gateway did not get its secret: %v, %d resources", err, len(resources))
		}
	})
}
