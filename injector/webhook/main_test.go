package webhook_test

import (
	"os"
	"testing"

	"k8s.io/client-go/rest"

	"github.com/trustmesh/trustmesh/test/kubeapi"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var shared kubeapi.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Stop()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}

func kube(t *testing.T) *rest.Config {
	t.Helper()
	kubeCfg := shared.Config(t)
	return kubeCfg
}
