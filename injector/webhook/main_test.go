package webhook_test

import (
	"testing"

	"k8s.io/client-go/rest"

	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var shared kubeapi.Shared

func TestMain(m *testing.M) { shared.Main(m) }

func kube(t *testing.T) *rest.Config {
	t.Helper()
	kubeCfg := shared.Config(t)
	return kubeCfg
}
