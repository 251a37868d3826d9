//go:build linux

package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// family is one address family's commands.
type family struct {
	v6               bool
	save, restore    string
	ipFlag, anyRoute string
}

var families = []family{
	{save: "iptables-save", restore: "iptables-restore", ipFlag: "-4", anyRoute: "0.0.0.0/0"},
	{v6: true, save: "ip6tables-save", restore: "ip6tables-restore", ipFlag: "-6", anyRoute: "::/0"},
}

func (f family) String() string {
	if f.v6 {
		return "IPv6"
	}
	return "IPv4"
}

// run runs name with args inside n through nsenter, with the namespace
// handed over as an open file so that a pinned Netns cannot change between
// the check and the command.
func (n Netns) run(ctx context.Context, stdin string, name string, args ...string) (string, error) {
	f, err := n.open()
	if err != nil {
		return "", err
	}
	defer f.Close()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/proc/self/fd/3", "--", name}, args...)...)
	cmd.ExtraFiles = []*os.File{f}
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("capture: %s %s in %s: %w: %s", name, strings.Join(args, " "), n.Path, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Install puts r into n, replacing whatever trustmesh installed there before
// (other chains and rules are left alone); installing the same rules again
// changes nothing. If any step fails, trustmesh's rules are removed from n
// again, so that n is either captured as r says or not captured at all.
func Install(ctx context.Context, n Netns, r Rules) error {
	if err := r.Validate(); err != nil {
		return err
	}
	if err := install(ctx, n, r); err != nil {
		if rerr := Remove(context.WithoutCancel(ctx), n); rerr != nil {
			return errors.Join(err, fmt.Errorf("capture: undoing a failed install: %w", rerr))
		}
		return err
	}
	return nil
}

func install(ctx context.Context, n Netns, r Rules) error {
	for _, f := range families {
		var want []chain
		if !f.v6 || r.IPv6 {
			want = r.chains()
		}
		if err := n.apply(ctx, f, want); err != nil {
			return err
		}
		if r.TPROXY && (!f.v6 || r.IPv6) {
			if err := n.addRoutes(ctx, f); err != nil {
				return err
			}
		} else if err := n.removeRoutes(ctx, f); err != nil {
			return err
		}
	}
	return nil
}

// Remove takes trustmesh's chains, the jumps to them and its TPROXY routing
// out of n; the pod's traffic then flows directly again. Removing from a
// namespace with none is not an error.
func Remove(ctx context.Context, n Netns) error {
	var errs []error
	for _, f := range families {
		if err := n.apply(ctx, f, nil); err != nil {
			errs = append(errs, err)
		}
		if err := n.removeRoutes(ctx, f); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// apply makes trustmesh's chains of family f in n exactly want.
func (n Netns) apply(ctx context.Context, f family, want []chain) error {
	out, err := n.run(ctx, "", f.save)
	if err != nil {
		return err
	}
	cur, err := parseSave(out)
	if err != nil {
		return fmt.Errorf("%s in %s: %w", f, n.Path, err)
	}
	in := restoreInput(want, cur)
	if in == "" {
		return nil
	}
	if _, err := n.run(ctx, in, f.restore, "--noflush", "--wait"); err != nil {
		return err
	}
	return nil
}

// addRoutes installs the fwmark rule and the local route that bring packets
// marked TPROXYMark to the proxy's transparent sockets.
func (n Netns) addRoutes(ctx context.Context, f family) error {
	if err := n.removeRoutes(ctx, f); err != nil {
		return err
	}
	if _, err := n.run(ctx, "", "ip", f.ipFlag, "rule", "add", "fwmark", fmt.Sprintf("%#x/%#x", TPROXYMark, TPROXYMask),
		"pref", fmt.Sprint(RulePriority), "lookup", fmt.Sprint(RouteTable)); err != nil {
		return err
	}
	_, err := n.run(ctx, "", "ip", f.ipFlag, "route", "replace", "local", f.anyRoute, "dev", "lo", "table", fmt.Sprint(RouteTable))
	return err
}

// removeRoutes deletes the rules at RulePriority and empties RouteTable.
func (n Netns) removeRoutes(ctx context.Context, f family) error {
	out, err := n.run(ctx, "", "ip", f.ipFlag, "rule", "show", "pref", fmt.Sprint(RulePriority))
	if err != nil {
		return err
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		if _, err := n.run(ctx, "", "ip", f.ipFlag, "rule", "del", "pref", fmt.Sprint(RulePriority)); err != nil {
			return err
		}
	}
	out, err = n.run(ctx, "", "ip", f.ipFlag, "route", "show", "table", fmt.Sprint(RouteTable))
	if err != nil && strings.Contains(err.Error(), "FIB table does not exist") {
		return nil // never made, or emptied
	}
	if err != nil || strings.TrimSpace(out) == "" {
		return err
	}
	_, err = n.run(ctx, "", "ip", f.ipFlag, "route", "flush", "table", fmt.Sprint(RouteTable))
	return err
}

// ProbeTPROXY reports whether the TPROXY target works in n, for IPv4 and,
// with v6, IPv6: it loads a TPROXY rule into a chain of its own in mangle and
// removes it again. A nil error means Rules.TPROXY can be installed; the
// node proxy otherwise keeps REDIRECT, and applications then see
// connections from their own pod's address instead of the remote pod's.
func ProbeTPROXY(ctx context.Context, n Netns, v6 bool) error {
	const probe = chainPrefix + "PROBE"
	for _, f := range families {
		if f.v6 && !v6 {
			continue
		}
		add := fmt.Sprintf("*mangle\n:%s - [0:0]\n-A %s -p tcp -j TPROXY --on-port %d --tproxy-mark %#x/%#x\nCOMMIT\n",
			probe, probe, DefaultInboundPlaintextPort, TPROXYMark, TPROXYMask)
		_, err := n.run(ctx, add, f.restore, "--noflush", "--wait")
		if _, derr := n.run(context.WithoutCancel(ctx), fmt.Sprintf("*mangle\n-F %s\n-X %s\nCOMMIT\n", probe, probe), f.restore, "--noflush", "--wait"); err == nil && derr != nil {
			return fmt.Errorf("capture: removing the TPROXY probe: %w", derr)
		}
		if err != nil {
			return fmt.Errorf("capture: TPROXY is not usable (%s): %w", f, err)
		}
	}
	return nil
}
