// Package capture builds the iptables rules that redirect a pod's TCP
// traffic to its Envoy, and checks the exclusions a pod asks for against the
// limits the mesh config sets.
//
// Inbound TCP goes to Envoy's inbound port, outbound TCP to its outbound
// port. Traffic of the proxy's uid and gid (Envoy and the agent) is never
// captured, so their own connections to the control plane leave directly.
// Only TCP is captured, as in Istio; UDP (DNS) leaves unchanged.
package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Config is what one pod's rules capture.
type Config struct {
	// ProxyUID and ProxyGID are the uid and gid of Envoy and the agent.
	ProxyUID, ProxyGID int64
	// InboundPort and OutboundPort are Envoy's capture listeners.
	InboundPort, OutboundPort int32
	// ExcludeInboundPorts reach the pod without Envoy: the agent's prober
	// and Envoy's readiness port always, and whatever the pod may exclude.
	ExcludeInboundPorts []int32
	// ExcludeOutboundPorts and ExcludeOutboundCIDRs leave without Envoy.
	ExcludeOutboundPorts []int32
	ExcludeOutboundCIDRs []netip.Prefix
}

// Family is an IP family.
type Family int

// IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Rules returns the iptables-restore input for family, to be applied with
// --noflush in the pod's fresh network namespace.
func (c Config) Rules(f Family) string {
	loopback, passthrough := "127.0.0.1/32", "127.0.0.6/32"
	if f == IPv6 {
		loopback, passthrough = "::1/128", "::6/128"
	}
	var b strings.Builder
	line := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	line("*nat")
	for _, chain := range []string{"TRUSTMESH_INBOUND", "TRUSTMESH_IN_REDIRECT", "TRUSTMESH_OUTPUT", "TRUSTMESH_REDIRECT"} {
		line(":%s - [0:0]", chain)
	}
	// Inbound: everything but the excluded ports goes to Envoy's inbound
	// listener.
	line("-A PREROUTING -p tcp -j TRUSTMESH_INBOUND")
	for _, p := range sortedPorts(c.ExcludeInboundPorts) {
		line("-A TRUSTMESH_INBOUND -p tcp --dport %d -j RETURN", p)
	}
	line("-A TRUSTMESH_INBOUND -p tcp -j TRUSTMESH_IN_REDIRECT")
	line("-A TRUSTMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports %d", c.InboundPort)
	// Outbound.
	line("-A OUTPUT -p tcp -j TRUSTMESH_OUTPUT")
	// Envoy forwarding inbound traffic to the application from the
	// passthrough address.
	line("-A TRUSTMESH_OUTPUT -s %s -o lo -j RETURN", passthrough)
	for _, owner := range []string{fmt.Sprintf("--uid-owner %d", c.ProxyUID), fmt.Sprintf("--gid-owner %d", c.ProxyGID)} {
		// The proxy calling this pod's own address (a workload calling its
		// own service) is inbound traffic and gets the inbound treatment.
		line("-A TRUSTMESH_OUTPUT ! -d %s -o lo -p tcp -m owner %s -j TRUSTMESH_IN_REDIRECT", loopback, owner)
		// The application on loopback talks to itself.
		line("-A TRUSTMESH_OUTPUT -o lo -m owner ! %s -j RETURN", owner)
		// The proxy's own traffic is never captured.
		line("-A TRUSTMESH_OUTPUT -m owner %s -j RETURN", owner)
	}
	line("-A TRUSTMESH_OUTPUT -d %s -j RETURN", loopback)
	for _, p := range c.ExcludeOutboundCIDRs {
		if (f == IPv4) == p.Addr().Is4() {
			line("-A TRUSTMESH_OUTPUT -d %s -j RETURN", p.Masked())
		}
	}
	for _, p := range sortedPorts(c.ExcludeOutboundPorts) {
		line("-A TRUSTMESH_OUTPUT -p tcp --dport %d -j RETURN", p)
	}
	line("-A TRUSTMESH_OUTPUT -j TRUSTMESH_REDIRECT")
	line("-A TRUSTMESH_REDIRECT -p tcp -j REDIRECT --to-ports %d", c.OutboundPort)
	line("COMMIT")
	return b.String()
}

// Script is the shell script the init container runs. It applies the IPv4
// rules, and the IPv6 rules whenever the pod has IPv6 at all, so that IPv6
// cannot bypass capture; any failure fails the container, and so the pod.
func (c Config) Script() string {
	return "set -eu\n" +
		"iptables-restore --noflush <<'EOF'\n" + c.Rules(IPv4) + "EOF\n" +
		"if [ -e /proc/net/if_inet6 ]; then\n" +
		"ip6tables-restore --noflush <<'EOF'\n" + c.Rules(IPv6) + "EOF\n" +
		"fi\n"
}

func sortedPorts(ports []int32) []int32 {
	out := slices.Clone(ports)
	slices.Sort(out)
	return slices.Compact(out)
}

// PortRange is an inclusive range of ports.
type PortRange struct{ First, Last int32 }

// Contains reports whether p is in r.
func (r PortRange) Contains(p int32) bool { return p >= r.First && p <= r.Last }

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// ParsePortRange parses "N" or "N-M".
func ParsePortRange(s string) (PortRange, error) {
	first, last, isRange := strings.Cut(strings.TrimSpace(s), "-")
	a, err := parsePort(first)
	if err != nil {
		return PortRange{}, err
	}
	b := a
	if isRange {
		if b, err = parsePort(last); err != nil {
			return PortRange{}, err
		}
	}
	if b < a {
		return PortRange{}, fmt.Errorf("capture: port range %q is empty", s)
	}
	return PortRange{a, b}, nil
}

func parsePort(s string) (int32, error) {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 32)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("capture: %q is not a port between 1 and 65535", s)
	}
	return int32(n), nil
}

// Limits are the exclusions the mesh config lets a pod ask for. The zero
// value allows none: every exclusion is a way around the mesh.
type Limits struct {
	InboundPorts  []PortRange
	OutboundPorts []PortRange
	OutboundCIDRs []netip.Prefix
}

// Request is what a pod asks to exclude, from its annotations.
type Request struct {
	InboundPorts  string
	OutboundPorts string
	OutboundCIDRs string
}

// ErrNotAllowed is wrapped by the error for an exclusion outside the limits.
var ErrNotAllowed = errors.New("exclusion not allowed by the mesh config")

// ErrMalformed is wrapped by the error for an exclusion that does not parse.
var ErrMalformed = errors.New("malformed exclusion")

// Exclusions are a checked Request.
type Exclusions struct {
	InboundPorts  []int32
	OutboundPorts []int32
	OutboundCIDRs []netip.Prefix
}

// Check parses r and checks every item against l, reporting all problems.
func (l Limits) Check(r Request) (Exclusions, error) {
	var ex Exclusions
	var errs []error
	ports := func(what, s string, allowed []PortRange) []int32 {
		var out []int32
		for _, item := range splitList(s) {
			p, err := parsePort(item)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w: %w", what, ErrMalformed, err))
				continue
			}
			if !slices.ContainsFunc(allowed, func(r PortRange) bool { return r.Contains(p) }) {
				errs = append(errs, fmt.Errorf("%s port %d: %w (allowed: %s)", what, p, ErrNotAllowed, rangesString(allowed)))
				continue
			}
			out = append(out, p)
		}
		return out
	}
	ex.InboundPorts = ports("inbound", r.InboundPorts, l.InboundPorts)
	ex.OutboundPorts = ports("outbound", r.OutboundPorts, l.OutboundPorts)
	for _, item := range splitList(r.OutboundCIDRs) {
		p, err := netip.ParsePrefix(item)
		if err != nil {
			errs = append(errs, fmt.Errorf("outbound CIDR: %w: %w", ErrMalformed, err))
			continue
		}
		p = p.Masked()
		if !slices.ContainsFunc(l.OutboundCIDRs, func(a netip.Prefix) bool { return Within(p, a) }) {
			errs = append(errs, fmt.Errorf("outbound CIDR %s: %w (allowed: %s)", p, ErrNotAllowed, prefixesString(l.OutboundCIDRs)))
			continue
		}
		ex.OutboundCIDRs = append(ex.OutboundCIDRs, p)
	}
	if len(errs) > 0 {
		return Exclusions{}, fmt.Errorf("capture: %w", errors.Join(errs...))
	}
	return ex, nil
}

// Within reports whether every address of p is in outer.
func Within(p, outer netip.Prefix) bool {
	return p.Addr().Is4() == outer.Addr().Is4() && p.Bits() >= outer.Bits() && outer.Contains(p.Addr())
}

// ParseLimits parses the mesh config's lists of port ranges and CIDRs.
func ParseLimits(inbound, outbound, cidrs []string) (Limits, error) {
	var l Limits
	var errs []error
	for _, s := range inbound {
		r, err := ParsePortRange(s)
		errs = append(errs, err)
		l.InboundPorts = append(l.InboundPorts, r)
	}
	for _, s := range outbound {
		r, err := ParsePortRange(s)
		errs = append(errs, err)
		l.OutboundPorts = append(l.OutboundPorts, r)
	}
	for _, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("capture: CIDR %q: %w", s, err))
		}
		l.OutboundCIDRs = append(l.OutboundCIDRs, p.Masked())
	}
	if err := errors.Join(errs...); err != nil {
		return Limits{}, err
	}
	return l, nil
}

func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func rangesString(rs []PortRange) string {
	if len(rs) == 0 {
		return "none"
	}
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ",")
}

func prefixesString(ps []netip.Prefix) string {
	if len(ps) == 0 {
		return "none"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
