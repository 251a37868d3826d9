package main

import (
	"net"
	"strconv"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// claSetDecoded is the endpoint set as claSet gave it when it decoded the
// whole ClusterLoadAssignment: the reference claSet must agree with.
func claSetDecoded(t *testing.T, b []byte) string {
	t.Helper()
	var cla endpointv3.ClusterLoadAssignment
	if err := proto.Unmarshal(b, &cla); err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for _, l := range cla.GetEndpoints() {
		for _, e := range l.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))))
		}
	}
	return endpointSet(addrs)
}

func socketEndpoint(addr string, port uint32) *endpointv3.LbEndpoint {
	return &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: addr, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		Hostname: "h"}},
		LoadBalancingWeight: nil}
}

// The simulated Envoys read svc-0's endpoints off the wire; they must
// read what decoding the whole message reads, whatever else it holds.
func TestClaSetReadsWhatDecodingReads(t *testing.T) {
	cases := map[string]*endpointv3.ClusterLoadAssignment{
		"none": {ClusterName: svc0Cluster},
		"bench": {ClusterName: svc0Cluster, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{socketEndpoint("10.0.0.2", 8080), socketEndpoint("10.0.0.1", 8080)}}}},
		"localities, other fields": {ClusterName: svc0Cluster, Endpoints: []*endpointv3.LocalityLbEndpoints{
			{Locality: &corev3.Locality{Zone: "a"}, Priority: 1, LbEndpoints: []*endpointv3.LbEndpoint{socketEndpoint("10.0.0.3", 9090)}},
			{LbEndpoints: []*endpointv3.LbEndpoint{socketEndpoint("fd00::1", 80), socketEndpoint("10.0.0.1", 8080)}},
		}, Policy: &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: nil}},
		"no socket address": {ClusterName: svc0Cluster, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{
			{HostIdentifier: &endpointv3.LbEndpoint_EndpointName{EndpointName: "named"}},
			{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
				Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/p"}}}}}},
			{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
				Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.9",
					PortSpecifier: &corev3.SocketAddress_NamedPort{NamedPort: "http"}}}}}}},
		}}}},
	}
	for name, cla := range cases {
		b, err := proto.Marshal(cla)
		if err != nil {
			t.Fatal(err)
		}
		got, err := claSet(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := claSetDecoded(t, b); got != want {
			t.Errorf("%s: claSet = %q, decoding the message gives %q", name, got, want)
		}
	}

	// A singular field given twice: the last wins, as when decoding.
	sa := func(addr string, port uint64) []byte {
		b := protowire.AppendTag(nil, 2, protowire.BytesType)
		b = protowire.AppendString(b, addr)
		b = protowire.AppendTag(b, 3, protowire.VarintType)
		return protowire.AppendVarint(b, port)
	}
	nest := func(num protowire.Number, v []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), v)
	}
	lb := nest(1, nest(1, nest(1, append(sa("10.0.0.1", 1), sa("10.0.0.2", 2)...))))
	twice := nest(2, nest(2, lb))
	got, err := claSet(twice)
	if err != nil {
		t.Fatal(err)
	}
	if want := claSetDecoded(t, twice); got != want || got != "10.0.0.2:2" {
		t.Errorf("a socket address given twice: claSet = %q, decoding gives %q, want 10.0.0.2:2", got, want)
	}

	// What does not parse is an error.
	b, _ := proto.Marshal(cases["bench"])
	for _, cut := range []int{1, 5, len(b) - 3} {
		if _, err := claSet(b[:cut]); err == nil {
			t.Errorf("claSet of the first %d of %d bytes: no error", cut, len(b))
		}
	}
}
