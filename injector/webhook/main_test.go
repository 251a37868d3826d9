package webhook_test

import (
	"fmt"
	"os"
	"sync"
	"testing"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/injector/internal/leakcheck"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var (
	kubeOnce sync.Once
	kubeEnv  *envtest.Environment
	kubeCfg  *rest.Config
	kubeErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if kubeEnv != nil {
		if err := kubeEnv.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop envtest:", err)
		}
	}
	if code == 0 {
		code = leakcheck.Check(os.Stderr)
	}
	os.Exit(code)
}

func kube(t *testing.T) *rest.Config {
	t.Helper()
	kubeOnce.Do(func() { kubeEnv, kubeCfg, kubeErr = kubeapi.Start() })
	if kubeErr != nil {
		t.Fatal(kubeErr)
	}
	return kubeCfg
}
