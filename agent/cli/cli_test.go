package cli_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/cli"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
)

// TestCommand runs the agent's command line, as both trustmesh agent and
// trustmesh-agent run it, through --validate: flags reach agent.Config,
// and what the agent refuses is refused before anything runs.
func TestCommand(t *testing.T) {
	dir := t.TempDir()
	roots := filepath.Join(dir, "roots.pem")
	auth := testca.New(t, spiffeid.RequireTrustDomainFromString("example.org"), time.Now())
	if err := os.WriteFile(roots, auth.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	token := filepath.Join(dir, "join-token")
	if err := os.WriteFile(token, []byte("tmjt.x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"--ca-address", "127.0.0.1:15012", "--ca-bundle", roots, "--validate"}
	for _, tc := range []struct {
		name string
		args []string
		env  string // the join token in agent.JoinTokenEnv
		want string // "" for valid
	}{
		{name: "join token file", args: append(base, "--join-token-file", token)},
		{name: "join token in the environment", args: base, env: "tmjt.x"},
		{name: "service-account token", args: append(base, "--token-file", token)},
		{name: "two tokens", args: append(base, "--token-file", token, "--join-token-file", token), want: "none of the others can be"},
		{name: "token file and environment", args: append(base, "--join-token-file", token), env: "tmjt.x", want: "only one of"},
		{name: "token on the command line", args: append(base, "--join-token", "tmjt.x"), want: "unknown flag: --join-token"},
		{name: "no CA address", args: []string{"--ca-bundle", roots, "--join-token-file", token}, want: `required flag(s) "ca-address" not set`},
		{name: "CA address without a port", args: append(base[2:], "--ca-address", "ca.example", "--join-token-file", token), want: "CA address"},
		{name: "unknown key type", args: append(base, "--join-token-file", token, "--key-type", "dsa"), want: "dsa"},
		{name: "an argument", args: append(base, "--join-token-file", token, "agent"), want: `unknown command "agent"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(agent.JoinTokenEnv, tc.env)
			cmd := cli.NewCommand("trustmesh-agent")
			var out bytes.Buffer
			cmd.SetOut(&out)
			cmd.SetErr(&out)
			cmd.SetArgs(tc.args)
			err := cmd.Execute()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want == "" && !strings.Contains(out.String(), "configuration is valid"):
				t.Fatalf("printed %q, want configuration is valid", out.String())
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one that says %q", err, tc.want)
			}
		})
	}
}
