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
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// Start starts a kube-apiserver and etcd. Share one per test package
// (TestMain): start-up takes seconds.
func Start() (*envtest.Environment, *rest.Config, error) {
	assets, err := Assets()
	if err != nil {
		return nil, nil, err
	}
	// Bringing it up and stopping it can take longer than envtest's 20 s
	// defaults while make test runs other packages' apiservers and -race
	// binaries on the same cores.
	env := &envtest.Environment{BinaryAssetsDirectory: assets,
		ControlPlaneStartTimeout: time.Minute, ControlPlaneStopTimeout: time.Minute}
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

// CRDs installs CustomResourceDefinitions into a fresh apiserver.
type CRDs func() ([]string, error)

// IstioCRDs are Istio's CRDs from the istio.io/api module in the build.
func IstioCRDs() ([]string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		return nil, fmt.Errorf("kubeapi: locate istio.io/api: %w", err)
	}
	return []string{filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")}, nil
}

// Shared is one kube-apiserver for a test package, started by the first
// test that asks for it, with CRDs installed, and stopped by Main:
//
//	var apiserver = kubeapi.Shared{CRDs: kubeapi.IstioCRDs}
//	func TestMain(m *testing.M) { apiserver.Main(m) }
type Shared struct {
	// CRDs, if set, names CRD files installed once when the apiserver
	// starts.
	CRDs CRDs

	once sync.Once
	env  *envtest.Environment
	cfg  *rest.Config
	err  error
}

// Main runs the package's tests, stops the apiserver if one started, and
// fails a passing run that leaves trustmesh goroutines running
// (leakcheck.CheckOurs). It does not return.
func (s *Shared) Main(m *testing.M) {
	code := m.Run()
	s.Stop()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}

// Config starts the apiserver on first use and returns its configuration,
// failing t if it cannot start or its CRDs cannot be installed.
func (s *Shared) Config(t testing.TB) *rest.Config {
	t.Helper()
	s.once.Do(s.start)
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.cfg
}

func (s *Shared) start() {
	s.env, s.cfg, s.err = Start()
	if s.err != nil || s.CRDs == nil {
		return
	}
	paths, err := s.CRDs()
	if err == nil {
		_, err = envtest.InstallCRDs(s.cfg, envtest.CRDInstallOptions{Paths: paths, ErrorIfPathMissing: true})
	}
	if err != nil {
		s.err = fmt.Errorf("kubeapi: install CRDs: %w", err)
	}
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
