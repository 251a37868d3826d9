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

// The simulated Envoys read svc-0's endpoints with claSet; it must read
// what decoding the whole message reads, whatever else it holds.
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
	name := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), svc0Cluster)
	twice := append(name, nest(2, nest(2, lb))...)
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

// Encodings where a walk along the path to the socket addresses parts ways
// with decoding: a later member of a oneof replaces an earlier one, a field
// of the wrong wire type is unknown, and a malformed field off the path,
// or a string that is not UTF-8, makes the whole message invalid. claSet
// must read each as proto.Unmarshal does, or refuse it as it does; and it
// refuses svc-0's answer holding another cluster's assignment.
func TestClaSetAgreesWithDecodingOnOddEncodings(t *testing.T) {
	nest := func(num protowire.Number, v []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), v)
	}
	str := func(num protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
	}
	vint := func(num protowire.Number, x uint64) []byte {
		return protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.VarintType), x)
	}
	cat := func(bs ...[]byte) []byte {
		var out []byte
		for _, b := range bs {
			out = append(out, b...)
		}
		return out
	}
	sa := cat(str(2, "10.0.0.1"), vint(3, 8080)) // SocketAddress
	addr := nest(1, sa)                          // Address{socket_address}
	ep := nest(1, addr)                          // Endpoint{address}
	cla := func(lb []byte) []byte { return cat(str(1, svc0Cluster), nest(2, nest(2, lb))) }
	cases := map[string][]byte{
		"lb endpoint then endpoint_name":    cla(cat(nest(1, ep), str(5, "named"))),
		"socket address then pipe":          cla(nest(1, nest(1, cat(addr, nest(2, str(1, "/p")))))),
		"port_value then named_port":        cla(nest(1, nest(1, nest(1, cat(sa, str(4, "http")))))),
		"port_value with a wrong wire type": cla(nest(1, nest(1, nest(1, cat(sa, nest(3, nil)))))),
		"malformed metadata":                cla(cat(nest(1, ep), nest(3, []byte{0xff}))),
		"malformed policy":                  cat(cla(nest(1, ep)), nest(4, []byte{0x0a, 0x05})),
		"address not utf-8":                 cla(nest(1, nest(1, nest(1, cat(str(2, "10.0.0.\xff"), vint(3, 8080)))))),
	}
	for name, b := range cases {
		got, err := claSet(b)
		var m endpointv3.ClusterLoadAssignment
		derr := proto.Unmarshal(b, &m)
		switch {
		case derr != nil && err == nil:
			t.Errorf("%s: proto.Unmarshal refuses it (%v); claSet reads it as %q", name, derr, got)
		case derr == nil && err != nil:
			t.Errorf("%s: decoding reads it as %q; claSet refuses it (%v)", name, claSetDecoded(t, b), err)
		case derr == nil:
			if want := claSetDecoded(t, b); got != want {
				t.Errorf("%s: claSet = %q, decoding gives %q", name, got, want)
			}
		}
	}
	other := cat(str(1, "outbound|8080||svc-1"), nest(2, nest(2, nest(1, ep))))
	if got, err := claSet(other); err == nil {
		t.Errorf("another cluster's assignment: claSet = %q, want an error", got)
	}
}

// go test -run '^$' -bench BenchmarkClaSet ./bench/cmd/xds-load/: the cost
// per client of reading svc-0's endpoints from the shared encoding.
func BenchmarkClaSet(b *testing.B) {
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: svc0Cluster, Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{socketEndpoint("10.0.0.2", 8080), socketEndpoint("10.0.0.1", 8080), socketEndpoint("10.0.0.3", 8080)}}}}
	w, err := proto.Marshal(cla)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := claSet(w); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// claName picks svc-0's assignment out of a state-of-the-world answer; a
// cluster_name given twice is the last one, as when decoding.
func TestClaNameIsTheLastGiven(t *testing.T) {
	name := func(s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), s)
	}
	b := append(name("outbound|8080||svc-1"), name(svc0Cluster)...)
	var m endpointv3.ClusterLoadAssignment
	if err := proto.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if got := claName(b); got != m.GetClusterName() || got != svc0Cluster {
		t.Errorf("claName = %q, decoding gives %q", got, m.GetClusterName())
	}
}
