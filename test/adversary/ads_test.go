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
	"google.golang.org/protobuf/types/known/anypb"
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

// fetch asks once for typ (and names) as n, over a state-of-the-world
// stream or, with delta, an incremental one, and returns the resources of
// the first response, or none if none came within wait. A refused stream
// returns its error.
func fetch(t *testing.T, s *server, w *workload, n *corev3.Node, delta bool, typ string, names []string, wait time.Duration) ([]*anypb.Any, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	client := discoveryv3.NewAggregatedDiscoveryServiceClient(s.dialGRPC(t, s.ca, w))
	var out []*anypb.Any
	var err error
	// A stream the server refused at once fails Send with io.EOF; its
	// status comes from Recv.
	if delta {
		var st discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
		if st, err = client.DeltaAggregatedResources(ctx); err != nil {
			return nil, err
		}
		_ = st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: n, TypeUrl: typ, ResourceNamesSubscribe: names})
		var resp *discoveryv3.DeltaDiscoveryResponse
		resp, err = st.Recv()
		for _, r := range resp.GetResources() {
			out = append(out, r.GetResource())
		}
	} else {
		var st discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
		if st, err = client.StreamAggregatedResources(ctx); err != nil {
			return nil, err
		}
		_ = st.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: typ, ResourceNames: names})
		var resp *discoveryv3.DiscoveryResponse
		resp, err = st.Recv()
		out = resp.GetResources()
	}
	if status.Code(err) == codes.DeadlineExceeded {
		return nil, nil
	}
	return out, err
}

// adsCode is the code an ADS stream for n ends with, or OK once it is
// served its listeners.
func adsCode(t *testing.T, s *server, w *workload, n *corev3.Node) codes.Code {
	t.Helper()
	_, err := fetch(t, s, w, n, false, listenerType, nil, 20*time.Second)
	return status.Code(err)
}
