package capture

import (
	"errors"
	"fmt"
)

// DefaultMark is the mark on the proxy's own sockets, which redirection
// leaves alone; Istio's ztunnel uses the same.
const DefaultMark = 0x539

// TPROXYMark (under TPROXYMask) marks packets that TPROXY takes and replies
// to the proxy's transparent connections; RouteTable routes them locally
// and RulePriority is the priority of the ip rule that selects it. The
// values are Istio's in-pod ones.
const (
	TPROXYMark   = 0x111
	TPROXYMask   = 0xfff
	RouteTable   = 133
	RulePriority = 32764
)

// Ports of the node proxy inside a pod's namespace, as ztunnel's.
const (
	DefaultOutboundPort         = 15001
	DefaultInboundPlaintextPort = 15006
	DefaultHBONEPort            = 15008
)

// ErrUnsupported is returned where network namespaces do not exist (off Linux).
var ErrUnsupported = errors.New("capture: network namespaces need Linux")

// ErrNoPod is returned by PodNetns when no process runs in the pod's cgroup.
var ErrNoPod = errors.New("capture: no process of the pod found")

// ErrHostNetwork is returned by PodNetns for a pod in the node's own network
// namespace: capturing there would redirect the node's traffic.
var ErrHostNetwork = errors.New("capture: the pod uses the node's network namespace")

// Netns is a network namespace, named by a file that refers to it.
type Netns struct {
	// Path is "/run/netns/NAME" or "/proc/PID/ns/net".
	Path string
	// Dev and Ino, when Ino is not 0, pin the namespace: opening Path must
	// give this namespace, or the operation fails. PodNetns sets them, so
	// that a PID reused by a process of another namespace is refused.
	Dev, Ino uint64
}

// NetnsByName is the namespace that `ip netns add NAME` made.
func NetnsByName(name string) Netns { return Netns{Path: "/run/netns/" + name} }

func (n Netns) String() string { return n.Path }

// Rules is the redirection of one pod's namespace.
type Rules struct {
	Mark             int    // the proxy's socket mark, never redirected; required
	Outbound         uint16 // outbound TCP goes here (15001)
	InboundPlaintext uint16 // inbound TCP not to HBONE goes here (15006)
	HBONE            uint16 // inbound TCP to this port is left alone (15008)
	IPv6             bool   // also install the IPv6 rules
	TPROXY           bool   // inbound plaintext by TPROXY, and transparent connections to the app
}

// DefaultRules is what the node proxy installs: ztunnel's ports and mark.
func DefaultRules() Rules {
	return Rules{Mark: DefaultMark, Outbound: DefaultOutboundPort,
		InboundPlaintext: DefaultInboundPlaintextPort, HBONE: DefaultHBONEPort}
}

// Validate refuses rules that would loop or leave traffic uncaptured.
func (r Rules) Validate() error {
	switch {
	case r.Mark <= 0 || r.Mark > 0xffffffff:
		return fmt.Errorf("capture: mark %#x: the proxy's sockets need a mark from 1 to 0xffffffff, or its own connections would be redirected", r.Mark)
	case r.Outbound == 0 || r.InboundPlaintext == 0 || r.HBONE == 0:
		return fmt.Errorf("capture: ports outbound %d, inbound plaintext %d, HBONE %d: none may be 0", r.Outbound, r.InboundPlaintext, r.HBONE)
	case r.Outbound == r.InboundPlaintext || r.Outbound == r.HBONE || r.InboundPlaintext == r.HBONE:
		return fmt.Errorf("capture: ports outbound %d, inbound plaintext %d, HBONE %d must differ", r.Outbound, r.InboundPlaintext, r.HBONE)
	case r.TPROXY && r.Mark&TPROXYMask == TPROXYMark:
		return fmt.Errorf("capture: mark %#x collides with the TPROXY mark %#x/%#x", r.Mark, TPROXYMark, TPROXYMask)
	}
	return nil
}
