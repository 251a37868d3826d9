//go:build linux

package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// IPv6 reports whether n has the IPv6 stack at all (present: the kernel
// has IPv6, /proc/sys/net/ipv6 as seen from inside n) and whether it is
// disabled on n's loopback (sysctl disable_ipv6). Every interface of a
// namespace with the stack can have IPv6 (link-local at least, and a
// process of the pod with NET_ADMIN can enable what was disabled), so its
// IPv6 is captured whatever addresses the mesh knows of the pod; where it
// is disabled on lo, TPROXY's local route for IPv6 cannot be installed.
func IPv6(n Netns) (present, disabled bool, err error) {
	err = n.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
		switch {
		case err == nil:
			present, disabled = true, strings.TrimSpace(string(b)) == "1"
		case errors.Is(err, fs.ErrNotExist):
			if _, serr := os.Stat("/proc/sys/net/ipv6"); serr == nil {
				present = true
			}
		default:
			return fmt.Errorf("capture: does %s have IPv6: %w", n.Path, err)
		}
		return nil
	})
	return present, disabled, err
}
