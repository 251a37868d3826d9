package arch

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// agentMain is the sidecar's binary: every injected pod maps it, so what it
// links is paid once per pod.
const agentMain = module + "/cmd/trustmesh-agent"

// agentForbidden are the packages the sidecar's binary must not link: the
// control plane's own parts and the heavy libraries only they need. Each
// entry covers the package and everything under it.
var agentForbidden = []string{
	// trustmesh's control plane: the agent reaches the CA over the wire.
	module + "/controlplane", module + "/ca", module + "/authz", module + "/xds",
	module + "/injector", module + "/mesh", module + "/demo", module + "/check",
	module + "/cmd/trustmesh",
	// Kubernetes clients and types, Helm, Istio's CRD clients.
	"k8s.io/client-go", "k8s.io/api", "k8s.io/apimachinery", "k8s.io/apiextensions-apiserver",
	"sigs.k8s.io/controller-runtime", "istio.io/client-go", "helm.sh/helm",
	// OPA, the journal's databases and the CA's key stores.
	"github.com/open-policy-agent/opa", "github.com/jackc/pgx", "modernc.org/sqlite", "go.step.sm/crypto",
	// go-control-plane's xDS server (the agent's SDS needs only the
	// stream handlers under pkg/server/sotw and pkg/server/delta), and
	// grpc-go's xDS client.
	"github.com/envoyproxy/go-control-plane/pkg/server/v3", "google.golang.org/grpc/xds",
}

// TestAgentBinaryDeps keeps the sidecar's binary small: its dependency
// graph, as the go command builds it, reaches nothing in agentForbidden.
func TestAgentBinaryDeps(t *testing.T) {
	deps := listDeps(t, agentMain)
	if _, ok := deps[agentMain]; !ok {
		t.Fatalf("go list -deps %s did not list the package itself", agentMain)
	}
	for _, v := range forbiddenDeps(deps, agentMain, agentForbidden) {
		t.Error(v)
	}
}

// TestAgentDepsCatchViolations runs the check on a made-up graph, so a check
// that could never fire is caught here rather than trusted.
func TestAgentDepsCatchViolations(t *testing.T) {
	deps := map[string][]string{
		"main":                        {"agent", "k8s.io/utils/clock"},
		"agent":                       {"agent/sds", "agent/kube", "k8s.io/apimachinery/pkg/util"},
		"agent/sds":                   {"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"},
		"agent/kube":                  {"k8s.io/client-go/kubernetes"},
		"k8s.io/client-go/kubernetes": {"k8s.io/apimachinery/pkg/runtime"},
	}
	got := forbiddenDeps(deps, "main", []string{"main", "k8s.io/client-go", "k8s.io/apimachinery",
		"github.com/envoyproxy/go-control-plane/pkg/server/v3"})
	// main itself is not linked by main, and apimachinery/pkg/runtime is
	// reached only through client-go, which is reported already.
	want := []string{
		"main links k8s.io/apimachinery/pkg/util: main imports agent, which imports k8s.io/apimachinery/pkg/util",
		"main links k8s.io/client-go/kubernetes: main imports agent, which imports agent/kube, " +
			"which imports k8s.io/client-go/kubernetes",
	}
	if !slices.Equal(got, want) {
		t.Errorf("violations:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// listDeps lists main's dependencies with their imports, as `go list -deps`
// resolves them for the default build.
func listDeps(t *testing.T, main string) map[string][]string {
	t.Helper()
	cmd := exec.Command(goTool(), "list", "-deps", "-json=ImportPath,Imports", main)
	cmd.Dir = moduleRoot(t)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", main, err, stderr.String())
	}
	deps := map[string][]string{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		deps[p.ImportPath] = p.Imports
	}
	return deps
}

// forbiddenDeps names every package main reaches under a forbidden prefix,
// other than through another one, each with one shortest import chain from
// main.
func forbiddenDeps(deps map[string][]string, main string, forbidden []string) []string {
	prev := map[string]string{main: ""}
	queue := []string{main}
	var out []string
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if cur != main && under(cur, forbidden) {
			chain := []string{cur}
			for n := prev[cur]; n != main; n = prev[n] {
				chain = append(chain, n)
			}
			slices.Reverse(chain)
			out = append(out, main+" links "+cur+": "+main+" imports "+strings.Join(chain, ", which imports "))
			continue // what it imports in turn is reported through it
		}
		for _, imp := range deps[cur] {
			if _, ok := prev[imp]; !ok {
				prev[imp] = cur
				queue = append(queue, imp)
			}
		}
	}
	slices.Sort(out)
	return out
}
