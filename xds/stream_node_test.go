package xds

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// TestKeepNodeIDDropsAllButTheID: once a request's node is checked, the
// message go-control-plane and the cache keep for the stream's life holds
// the node's id and nothing more, the same message (the state of the
// world server keeps that very pointer).
func TestKeepNodeIDDropsAllButTheID(t *testing.T) {
	md, err := structpb.NewStruct(map[string]any{"NAMESPACE": "ns-a", "SERVICE_ACCOUNT": "sa-a", "LABELS": map[string]any{"app": "a"}})
	if err != nil {
		t.Fatal(err)
	}
	n := &corev3.Node{Id: "sidecar~10.0.0.1~pod-a.ns-a~ns-a.svc.cluster.local", Cluster: "a.ns-a", Metadata: md,
		UserAgentName: "envoy", Locality: &corev3.Locality{Region: "r"}}
	kept := n
	keepNodeID(n)
	if n != kept {
		t.Fatal("keepNodeID replaced the message")
	}
	if want := (&corev3.Node{Id: "sidecar~10.0.0.1~pod-a.ns-a~ns-a.svc.cluster.local"}); !proto.Equal(n, want) {
		t.Fatalf("node after keepNodeID = %v, want only its id", n)
	}
	keepNodeID(nil)
}
