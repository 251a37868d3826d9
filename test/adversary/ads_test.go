package adversary

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	secretType   = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
	// gatewaySecret is the name under which a gateway asks for its
	// certificate.
	gatewaySecret = "kubernetes://istio-system/www-cert"
)

// node is an Envoy node as istio-agent names it: TYPE~IP~POD.NS~NS.svc.cluster.local.
func node(typ, ip, pod, ns, sa string, labels map[string]string) *corev3.Node {
	l := map[string]any{}
	for k, v := range labels {
		l[k] = v
	}
	md, err := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": sa, "NAMESPACE": ns, "LABELS": l})
	if err != nil {
		panic(err)
	}
	return &corev3.Node{Id: fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", typ, ip, pod, ns, ns), Metadata: md}
}

func sidecarNode(pod, ns, sa string) *corev3.Node {
	return node("sidecar", "10.9.9.9", pod, ns, sa, nil)
}

// ads opens an ADS stream on the CA port as w.
func ads(ctx context.Context, t *testing.T, s *server, w *workload) (discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient, error) {
	t.Helper()
	return discoveryv3.NewAggregatedDiscoveryServiceClient(s.dialGRPC(t, s.ca, w)).StreamAggregatedResources(ctx)
}

// fetch asks once for typ (and names) as n, and returns the first response,
// or nil if none came within wait. A refused stream returns its error.
func fetch(t *testing.T, s *server, w *workload, n *corev3.Node, typ string, names []string, wait time.Duration) (*discoveryv3.DiscoveryResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	st, err := ads(ctx, t, s, w)
	if err != nil {
		return nil, err
	}
	// A stream the server refused at once fails Send with io.EOF; its
	// status comes from Recv.
	_ = st.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: typ, ResourceNames: names})
	resp, err := st.Recv()
	if status.Code(err) == codes.DeadlineExceeded {
		return nil, nil
	}
	return resp, err
}

// adsCode is the code an ADS stream for n ends with, or OK once it is
// served its listeners.
func adsCode(t *testing.T, s *server, w *workload, n *corev3.Node) codes.Code {
	t.Helper()
	_, err := fetch(t, s, w, n, listenerType, nil, 20*time.Second)
	return status.Code(err)
}
