// Package capture puts a pod's TCP through the node proxy: it enters the
// pod's network namespace to open sockets there (Netns), installs the
// redirection rules that send the pod's outbound and inbound TCP to those
// sockets (Install, Remove), reads where a redirected connection was going
// (OriginalDst), and finds a Kubernetes pod's network namespace from /proc
// (PodNetns).
//
// # Threads
//
// setns(2) changes the namespace of one thread. Netns.Do runs its function on
// a new goroutine locked to its OS thread, moves that thread into the
// namespace and never unlocks it: when the goroutine returns, the Go runtime
// ends the thread instead of reusing it, so no other goroutine ever runs in a
// pod's namespace by accident. Sockets keep the namespace they were created
// in, so a listener or connection made inside Do is used from any goroutine
// afterwards. Addresses given to Listen and Dial must be IP literals: a name
// would be resolved on another thread, in the node's namespace.
//
// # Rules
//
// Install writes trustmesh's own chains, with iptables-restore run through
// nsenter in the pod's namespace (IPv4 and, with Rules.IPv6, IPv6):
//
//	nat TRUSTMESH_OUTPUT (from OUTPUT):
//	    out through lo                   RETURN   the pod talking to itself
//	    marked with Rules.Mark           RETURN   the proxy's own sockets
//	    TCP                              REDIRECT to Rules.Outbound (15001)
//	nat TRUSTMESH_PREROUTING (from PREROUTING):
//	    in through lo                    RETURN
//	    TCP to port Rules.HBONE (15008)  RETURN   the proxy's HBONE listener
//	    TCP                              REDIRECT to Rules.InboundPlaintext (15006)
//
// REDIRECT of a locally made connection goes to 127.0.0.1 (or ::1), and of an
// arriving one to the address it arrived on, so the proxy listens on the
// wildcard address. OriginalDst gives the address the connection was for.
// Only TCP is captured: UDP (DNS) and other protocols pass unchanged.
//
// # TPROXY and source addresses
//
// With Rules.TPROXY, inbound plaintext is taken by TPROXY in mangle instead
// of REDIRECT (the listener must then be made with ListenTransparent), and
// the namespace gets what a transparent connection to the application needs,
// as Istio's in-pod mode does: a connection the proxy makes with
// DialTransparent, from the remote peer's address to the application, is
// marked Rules.Mark; its packets reach PREROUTING through lo, where the mark
// is saved on the connection as TPROXYMark; the application's replies get
// that mark back in mangle OUTPUT, and the rule "fwmark TPROXYMark lookup
// RouteTable" with "local default dev lo" in RouteTable delivers them to the
// proxy's socket instead of sending them out of the pod. The application
// then sees the remote pod's address as the source. Without TPROXY, the
// proxy connects from the pod's own address and the application sees that.
//
// Install and Remove touch only the TRUSTMESH_* chains, the jumps to them,
// the ip rule with priority RulePriority and route table RouteTable. The
// iptables and ip6tables commands on PATH are used (nft or legacy backend,
// whichever the node chose), and iproute2's ip for TPROXY.
package capture
