package injector_test

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/trustmesh/trustmesh/agent/cli"
	"github.com/trustmesh/trustmesh/injector"
)

// TestAgentContainerRunsTheAgentBinary checks the injected agent container
// against the agent's own command line (agent/cli, which trustmesh-agent
// runs): it runs the agent-only binary, and the agent accepts every
// argument the injector gives it.
func TestAgentContainerRunsTheAgentBinary(t *testing.T) {
	p := basePod()
	if _, err := goldenInjector(t).InjectPod("shop", &p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(p.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == injector.ContainerAgent })
	if i < 0 {
		t.Fatalf("no %s container in %+v", injector.ContainerAgent, p.Spec.InitContainers)
	}
	c := p.Spec.InitContainers[i]
	if !slices.Equal(c.Command, []string{"trustmesh-agent"}) {
		t.Fatalf("agent container runs %q, want the agent alone, trustmesh-agent", c.Command)
	}
	cmd := cli.NewCommand("trustmesh-agent")
	if err := cmd.ParseFlags(c.Args); err != nil {
		t.Fatalf("trustmesh-agent refuses the injected flags %q: %v", c.Args, err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		t.Fatalf("trustmesh-agent refuses the injected arguments %q: %v", c.Args, err)
	}
	if err := cmd.ValidateRequiredFlags(); err != nil {
		t.Fatalf("injected arguments %q: %v", c.Args, err)
	}
	if got := cmd.Flags().Lookup("ca-address").Value.String(); !strings.HasSuffix(got, ":15012") {
		t.Errorf("--ca-address %q, want the CA's port 15012", got)
	}
}
