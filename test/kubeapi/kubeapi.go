// Package kubeapi starts a real kube-apiserver and etcd for tests, through
// controller-runtime's envtest. The binaries are built from the Go module
// proxy by hack/envtest-assets.sh, once, into a cache; KUBEBUILDER_ASSETS
// names them when set, and otherwise the script is run (a no-op when cached).
package kubeapi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Start starts a kube-apiserver and etcd. Share one per test package
// (TestMain): start-up takes seconds.
func Start() (*envtest.Environment, *rest.Config, error) {
	assets, err := Assets()
	if err != nil {
		return nil, nil, err
	}
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	// kube-apiserver refuses a loopback advertise address with the endpoint
	// reconciler on, and finds none at all without a default route.
	env.ControlPlane.GetAPIServer().Configure().
		Set("advertise-address", "127.0.0.1").
		Set("endpoint-reconciler-type", "none")
	cfg, err := env.Start()
	if err != nil {
		return nil, nil, fmt.Errorf("kubeapi: start envtest with assets in %s: %w", assets, err)
	}
	return env, cfg, nil
}

// Assets returns the directory holding kube-apiserver and etcd.
func Assets() (string, error) {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir, nil
	}
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("kubeapi: cannot locate the repository; set KUBEBUILDER_ASSETS")
	}
	script := filepath.Join(filepath.Dir(file), "..", "..", "hack", "envtest-assets.sh")
	cmd := exec.Command("bash", script)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("kubeapi: %s: %w", script, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Shared is one kube-apiserver for a test package, started by the first
// test that asks for it and stopped by TestMain:
//
//	var kube kubeapi.Shared
//	func TestMain(m *testing.M) { code := m.Run(); kube.Stop(); os.Exit(code) }
type Shared struct {
	once sync.Once
	env  *envtest.Environment
	cfg  *rest.Config
	err  error
}

// Config starts the apiserver on first use and returns its configuration,
// failing t if it cannot start.
func (s *Shared) Config(t testing.TB) *rest.Config {
	t.Helper()
	s.once.Do(func() { s.env, s.cfg, s.err = Start() })
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.cfg
}

// Stop stops the apiserver if it was started, reporting failures on stderr.
func (s *Shared) Stop() {
	if s.env == nil {
		return
	}
	if err := s.env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "kubeapi: stop envtest:", err)
	}
}
