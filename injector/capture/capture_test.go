package capture_test

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/injector/capture"
)

func TestCheck(t *testing.T) {
	limits, err := capture.ParseLimits([]string{"9100"}, []string{"5432", "6379-6380"}, []string{"10.96.0.0/12", "fd00::/8"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		req     capture.Request
		want    capture.Exclusions
		wantErr error
	}{
		{name: "nothing asked"},
		{name: "within the limits",
			req: capture.Request{InboundPorts: "9100", OutboundPorts: " 5432 ,6380", OutboundCIDRs: "10.96.1.7/32,fd00:1::/64"},
			want: capture.Exclusions{InboundPorts: []int32{9100}, OutboundPorts: []int32{5432, 6380},
				OutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.1.7/32"), netip.MustParsePrefix("fd00:1::/64")}}},
		{name: "host bits are masked", req: capture.Request{OutboundCIDRs: "10.96.1.7/24"},
			want: capture.Exclusions{OutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.1.0/24")}}},
		{name: "port outside", req: capture.Request{OutboundPorts: "443"}, wantErr: capture.ErrNotAllowed},
		{name: "inbound port allowed only outbound", req: capture.Request{InboundPorts: "5432"}, wantErr: capture.ErrNotAllowed},
		{name: "wider CIDR", req: capture.Request{OutboundCIDRs: "10.0.0.0/8"}, wantErr: capture.ErrNotAllowed},
		{name: "everything", req: capture.Request{OutboundCIDRs: "0.0.0.0/0"}, wantErr: capture.ErrNotAllowed},
		{name: "IPv4-mapped IPv6 is not IPv4", req: capture.Request{OutboundCIDRs: "::ffff:10.96.0.0/108"}, wantErr: capture.ErrNotAllowed},
		{name: "wildcard", req: capture.Request{OutboundPorts: "*"}, wantErr: capture.ErrMalformed},
		{name: "port zero", req: capture.Request{InboundPorts: "0"}, wantErr: capture.ErrMalformed},
		{name: "not a CIDR", req: capture.Request{OutboundCIDRs: "10.96.0.1"}, wantErr: capture.ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := limits.Check(tc.req)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("error %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.InboundPorts, tc.want.InboundPorts) || !slices.Equal(got.OutboundPorts, tc.want.OutboundPorts) ||
				!slices.Equal(got.OutboundCIDRs, tc.want.OutboundCIDRs) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestZeroLimitsAllowNothing(t *testing.T) {
	_, err := capture.Limits{}.Check(capture.Request{InboundPorts: "80", OutboundPorts: "80", OutboundCIDRs: "10.0.0.1/32"})
	if !errors.Is(err, capture.ErrNotAllowed) {
		t.Fatalf("error %v, want ErrNotAllowed", err)
	}
}

func TestParsePortRange(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want capture.PortRange
		ok   bool
	}{
		{"80", capture.PortRange{First: 80, Last: 80}, true},
		{"8000-8100", capture.PortRange{First: 8000, Last: 8100}, true},
		{"1-65535", capture.PortRange{First: 1, Last: 65535}, true},
		{"8100-8000", capture.PortRange{}, false},
		{"0", capture.PortRange{}, false},
		{"65536", capture.PortRange{}, false},
		{"80-", capture.PortRange{}, false},
		{"http", capture.PortRange{}, false},
	} {
		got, err := capture.ParsePortRange(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParsePortRange(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// TestRules checks the properties the mesh depends on, in both families:
// the proxy's own traffic is never captured, everything else is, and
// exclusions appear only in their family.
func TestRules(t *testing.T) {
	c := capture.Config{
		ProxyUID: 1337, ProxyGID: 1337, InboundPort: 15006, OutboundPort: 15001,
		ExcludeInboundPorts:  []int32{15021, 15020, 15020},
		ExcludeOutboundPorts: []int32{5432},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00::/8")},
	}
	for _, tc := range []struct {
		family   capture.Family
		want     []string
		unwanted []string
	}{
		{capture.IPv4, []string{
			"-A TRUSTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
			"-A TRUSTMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
			"-A TRUSTMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
			"-A TRUSTMESH_OUTPUT -p tcp --dport 5432 -j RETURN",
			"-A TRUSTMESH_INBOUND -p tcp --dport 15020 -j RETURN\n-A TRUSTMESH_INBOUND -p tcp --dport 15021 -j RETURN\n",
			"-A TRUSTMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n",
			"-A TRUSTMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
		}, []string{"fd00::/8", "::1"}},
		{capture.IPv6, []string{
			"-A TRUSTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
			"-A TRUSTMESH_OUTPUT -d fd00::/8 -j RETURN",
			"-A TRUSTMESH_OUTPUT -d ::1/128 -j RETURN",
		}, []string{"10.96.0.0/12", "127.0.0.1"}},
	} {
		rules := c.Rules(tc.family)
		for _, w := range tc.want {
			if !strings.Contains(rules, w) {
				t.Errorf("IPv%d rules lack %q:\n%s", tc.family, w, rules)
			}
		}
		for _, u := range tc.unwanted {
			if strings.Contains(rules, u) {
				t.Errorf("IPv%d rules contain %q:\n%s", tc.family, u, rules)
			}
		}
		if strings.Count(rules, "--dport 15020") != 1 {
			t.Errorf("duplicate exclusion not merged:\n%s", rules)
		}
		// The last rule of the outbound chain captures whatever no
		// exclusion returned.
		lines := strings.Split(strings.TrimSpace(rules), "\n")
		var last string
		for _, l := range lines {
			if strings.HasPrefix(l, "-A TRUSTMESH_OUTPUT ") {
				last = l
			}
		}
		if last != "-A TRUSTMESH_OUTPUT -j TRUSTMESH_REDIRECT" {
			t.Errorf("outbound chain ends with %q", last)
		}
	}
	script := c.Script()
	if !strings.HasPrefix(script, "set -eu\n") || !strings.Contains(script, "ip6tables-restore --noflush") {
		t.Errorf("script does not fail closed or skips IPv6:\n%s", script)
	}
}

// TestScriptApplies runs the init container's script with the real
// iptables-restore in a fresh network namespace, as the pod's would be,
// and reads the rules back. It needs root, unshare and iptables, and says
// so when it cannot run.
func TestScriptApplies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	for _, tool := range []string{"unshare", "iptables-restore", "ip6tables-restore", "iptables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s: %v", tool, err)
		}
	}
	c := capture.Config{
		ProxyUID: 1337, ProxyGID: 1337, InboundPort: 15006, OutboundPort: 15001,
		ExcludeInboundPorts:  []int32{15020, 15021, 9100},
		ExcludeOutboundPorts: []int32{5432},
		ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00::/8")},
	}
	out, err := exec.Command("unshare", "-n", "sh", "-c",
		c.Script()+"iptables-save -t nat\nif [ -e /proc/net/if_inet6 ]; then ip6tables-save -t nat; fi\n").CombinedOutput()
	if err != nil {
		t.Fatalf("the script failed: %v\n%s", err, out)
	}
	saved := string(out)
	for _, want := range []string{
		"-A PREROUTING -p tcp -j TRUSTMESH_INBOUND",
		"-A TRUSTMESH_INBOUND -p tcp -m tcp --dport 9100 -j RETURN",
		"-A TRUSTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
		"-A TRUSTMESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
		"-A TRUSTMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
	} {
		if !strings.Contains(saved, want) {
			t.Errorf("applied rules lack %q:\n%s", want, saved)
		}
	}
	if _, err := os.Stat("/proc/net/if_inet6"); err == nil && !strings.Contains(saved, "-A TRUSTMESH_OUTPUT -d fd00::/8 -j RETURN") {
		t.Errorf("IPv6 rules not applied:\n%s", saved)
	}
}
