package adversary

import "testing"

// TestClientSetRemoteAddress (class 5): a client's own
// x-envoy-external-address neither escapes a remoteIpBlocks DENY nor
// satisfies a remoteIpBlocks ALLOW at a sidecar; only a gateway's is
// believed, in any spelling of the address.
func TestClientSetRemoteAddress(t *testing.T) {
	s := shared(t)
	spoof := func(ns, src, peerIP, ext string) check {
		return check{dst: ns, src: src, srcIP: peerIP, headers: map[string]string{"x-envoy-external-address": ext}}
	}
	runDecisions(t, s, []decisionCase{
		{"DENY: control, blocked peer", check{dst: "xff-deny", srcIP: "203.0.113.7"}, deny},
		{"DENY: anonymous blocked peer claims another address", spoof("xff-deny", "", "203.0.113.7", "198.51.100.1"), deny},
		{"DENY: workload in a blocked network claims another address", spoof("xff-deny", webID, "203.0.113.7", "198.51.100.1"), deny},
		{"DENY: control, the gateway forwards a blocked client", spoof("xff-deny", gatewayID, gatewayAddr, "203.0.113.9"), deny},
		{"ALLOW: control, the gateway forwards an allowed client", spoof("xff-allow", gatewayID, gatewayAddr, "198.51.100.1"), allow},
		{"ALLOW: anonymous client claims an allowed address", spoof("xff-allow", "", "203.0.113.7", "198.51.100.1"), deny},
		{"ALLOW: workload claims an allowed address", spoof("xff-allow", webID, "10.0.1.1", "198.51.100.1"), deny},
		{"IPv6: control, the gateway forwards a blocked client", spoof("v6-remote", gatewayID, gatewayAddr, "2001:db8::7"), deny},
		{"IPv6: the gateway forwards it upper case and expanded", spoof("v6-remote", gatewayID, gatewayAddr, "2001:DB8:0:0:0:0:0:7"), deny},
		{"IPv6: control, the gateway forwards a client from outside", spoof("v6-remote", gatewayID, gatewayAddr, "2001:db9::7"), allow},
		{"IPv6: a remote.ip condition, forwarded by the gateway", spoof("v6-when", gatewayID, gatewayAddr, "2001:db8::3"), deny},
		{"IPv6: a workload claims a blocked network's neighbour", spoof("v6-remote", webID, "2001:db8::9", "2001:db9::1"), deny},
	})
}
