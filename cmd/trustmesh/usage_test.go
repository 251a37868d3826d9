package main

import (
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// TestUsageErrorsExit2 holds every command to exit 2 on a usage error, with
// nothing on stdout: an extra argument (or an unknown subcommand), an
// unknown flag, and, where the command has them, its required flags
// missing. The commands are walked from the root, so a new one is held
// too.
func TestUsageErrorsExit2(t *testing.T) {
	type usageCase struct {
		name string
		args []string
	}
	var cases []usageCase
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		if c.Hidden {
			return
		}
		name := strings.Join(append([]string{"trustmesh"}, path...), " ")
		with := func(extra ...string) []string { return append(append([]string(nil), path...), extra...) }
		cases = append(cases,
			usageCase{name + " with an extra argument", with("bogus-extra")},
			usageCase{name + " with an unknown flag", with("--bogus-flag")})
		if len(requiredFlags(c)) > 0 {
			cases = append(cases, usageCase{name + " without " + strings.Join(requiredFlags(c), ", "), with()})
		}
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string(nil), path...), sub.Name()))
		}
	}
	walk(newRootCmd(), nil)
	if len(cases) < 60 {
		t.Fatalf("walked only %d cases; the command tree was not found", len(cases))
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out, err := exec.Command(binary, tc.args...).Output()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 || len(out) != 0 {
				t.Fatalf("trustmesh %s: exit %v, output %q, stderr %q; want exit 2 and no output", strings.Join(tc.args, " "), err, out, stderrOf(err))
			}
		})
	}
}

// requiredFlags are the flags of c marked required.
func requiredFlags(c *cobra.Command) []string {
	var names []string
	c.Flags().VisitAll(func(f *pflag.Flag) {
		if len(f.Annotations[cobra.BashCompOneRequiredFlag]) > 0 {
			names = append(names, "--"+f.Name)
		}
	})
	return names
}

// TestDurationFlagErrorNamesItsFlag holds a bad days-duration value to an
// error that names the flag and no other command: the value is shared by
// check and analyze, and said "check: duration ..." under analyze.
func TestDurationFlagErrorNamesItsFlag(t *testing.T) {
	_, stderr, code := runAnalyze(t, "--stale-dry-run", "2w", "-f", "../../examples/policies")
	if code != 2 || !strings.Contains(stderr, `"--stale-dry-run"`) || !strings.Contains(stderr, `duration "2w": want e.g. 30d`) || strings.Contains(stderr, "check:") {
		t.Fatalf("exit %d, stderr %q; want exit 2 and an error about --stale-dry-run's duration naming no other command", code, stderr)
	}
}

// TestHelpAndCompletion holds cobra's own help and completion commands,
// which the walk in TestUsageErrorsExit2 holds to exit 2 on a bad
// argument, to still answer a good one, and help to exit 2 on a path that
// names a command's unknown subcommand.
func TestHelpAndCompletion(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"help", "ca"}, {"help", "policy", "check"}, {"completion", "bash"}, {"completion", "zsh"}} {
		out, err := exec.Command(binary, args...).Output()
		if err != nil || len(out) == 0 {
			t.Errorf("trustmesh %s: exit %v, %d bytes of output, stderr %q; want exit 0 and output", strings.Join(args, " "), err, len(out), stderrOf(err))
		}
	}
	for _, args := range [][]string{{"help", "nosuch"}, {"help", "ca", "nosuch"}, {"completion", "nosuch"}, {"completion", "bash", "extra"}} {
		out, err := exec.Command(binary, args...).Output()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 || len(out) != 0 {
			t.Errorf("trustmesh %s: exit %v, output %q, stderr %q; want exit 2 and no output", strings.Join(args, " "), err, out, stderrOf(err))
		}
	}
}
