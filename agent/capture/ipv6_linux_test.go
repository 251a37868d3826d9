//go:build linux

package capture

import (
	"os"
	"strings"
	"testing"
)

// IPv6 is seen from inside the namespace: a fresh one has the stack and it
// is on; disabling it on lo there (not on the node) is reported.
func TestIPv6(t *testing.T) {
	n, name := newNetns(t)
	present, disabled, err := IPv6(n)
	if err != nil || !present || disabled {
		t.Fatalf("fresh namespace: present %v disabled %v %v, want present and on", present, disabled, err)
	}
	sh(t, "ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
	present, disabled, err = IPv6(n)
	if err != nil || !present || !disabled {
		t.Fatalf("disabled on lo: present %v disabled %v %v, want present and disabled", present, disabled, err)
	}
	// Read inside n, not in the node's namespace, whose lo is untouched.
	if b, err := os.ReadFile("/proc/sys/net/ipv6/conf/lo/disable_ipv6"); err == nil && strings.TrimSpace(string(b)) != "0" {
		t.Logf("the node's own lo has IPv6 disabled too (%q)", b)
	}
}
