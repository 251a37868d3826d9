package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/internal/freeport"
)

// binary is the trustmesh binary built for process-level tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "trustmesh-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "trustmesh")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build trustmesh: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type serveProc struct {
	cmd            *exec.Cmd
	ca, monitoring string
	stderr         bytes.Buffer
}

// startServe runs `trustmesh serve` as a process and waits until it is ready.
func startServe(t *testing.T, dataDir string) *serveProc {
	t.Helper()
	p := &serveProc{ca: freeport.Addr(t), monitoring: freeport.Addr(t)}
	p.cmd = exec.Command(binary, "serve", "--data-dir", dataDir,
		"--listen-ca", p.ca, "--listen-monitoring", p.monitoring, "--listen-bundle", "", "--listen-ui", "off")
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + p.monitoring + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trustmesh serve did not become ready:\n%s", p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("trustmesh serve exited with %v:\n%s", err, p.stderr.String())
	}
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, uiOff(args)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("trustmesh %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// issue obtains a certificate from a running serve with a join token.
func issue(t *testing.T, caAddr string, roots *x509.CertPool, token string) []*x509.Certificate {
	t.Helper()
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for _, p := range resp.CertChain {
		b, _ := pem.Decode([]byte(p))
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	return chain
}

func bundleOf(t *testing.T, dataDir string) (string, *x509bundle.Bundle, *x509.CertPool) {
	t.Helper()
	out := run(t, "ca", "bundle", "--data-dir", dataDir)
	b, err := x509bundle.Parse(spiffeid.RequireTrustDomainFromString("cluster.local"), []byte(out))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range b.X509Authorities() {
		pool.AddCert(c)
	}
	return out, b, pool
}

// TestServeRestartKeepsCA restarts `trustmesh serve` on the same data
// directory: it keeps its CA, and what it issued before still verifies.
func TestServeRestartKeepsCA(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	id := spiffeid.RequireFromString("spiffe://cluster.local/vm/restart")

	first := startServe(t, dataDir)
	bundlePEM, firstBundle, roots := bundleOf(t, dataDir)
	token := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String(), "--ttl", "10m"))
	if !strings.HasPrefix(token, "tmjt.") || strings.ContainsAny(token, " \n") {
		t.Fatalf("token create printed %q, want only the token", token)
	}
	before := issue(t, first.ca, roots, token)
	first.stop(t)
	// The first start says it created the CA, and which.
	root := firstBundle.X509Authorities()[0]
	sum := sha256.Sum256(root.Raw)
	var hexes []string
	for _, b := range sum {
		hexes = append(hexes, strings.ToUpper(hex.EncodeToString([]byte{b})))
	}
	wantFP := "root_sha256=" + strings.Join(hexes, ":") // as openssl x509 -fingerprint -sha256 prints it
	for _, want := range []string{`msg="created a new CA"`, "trust_domain=cluster.local", "data_dir=" + dataDir,
		wantFP, "root_not_after=" + root.NotAfter.UTC().Format(time.RFC3339), "journal=" + filepath.Join(dataDir, "journal.db")} {
		if !strings.Contains(first.stderr.String(), want) {
			t.Errorf("the first start does not say %q:\n%s", want, first.stderr.String())
		}
	}

	for _, f := range []string{"ca/gen-1/root-key.pem", "ca/gen-1/ca-key.pem", "journal.db", "checkpoint-key.pem"} {
		fi, err := os.Stat(filepath.Join(dataDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}

	second := startServe(t, dataDir)
	afterPEM, bundle, roots := bundleOf(t, dataDir)
	if afterPEM != bundlePEM {
		t.Fatal("the trust bundle changed across a restart")
	}
	if got, _, err := x509svid.Verify(before[:2], bundle); err != nil || got != id {
		t.Fatalf("a certificate issued before the restart = %v, %v; want it to verify as %s", got, err, id)
	}
	token2 := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String()))
	after := issue(t, second.ca, roots, token2)
	if !after[1].Equal(before[1]) || !after[2].Equal(before[2]) {
		t.Fatal("the restarted CA signs with another intermediate or root")
	}
	second.stop(t)
	if log := second.stderr.String(); !strings.Contains(log, `msg="reusing the CA"`) || !strings.Contains(log, wantFP) || strings.Contains(log, "created a new CA") {
		t.Errorf("the second start does not say it reused the CA %s:\n%s", wantFP, log)
	}
}

// uiOff turns serve's web UI off unless args set --listen-ui: its default
// port is fixed, and serves in parallel tests would fight over it.
func uiOff(args []string) []string {
	if len(args) == 0 || args[0] != "serve" {
		return args
	}
	for _, a := range args {
		if a == "--listen-ui" || strings.HasPrefix(a, "--listen-ui=") || a == "--help" {
			return args
		}
	}
	return append(append([]string(nil), args...), "--listen-ui=off")
}

// refuse runs trustmesh, which must fail within a minute, and returns its
// exit code and stderr.
func refuse(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, uiOff(args)...)
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ctx.Err() != nil {
		t.Fatalf("trustmesh %s: %v, want a refusal\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return ee.ExitCode(), stderr.String()
}

// TestServeHelpNamesEveryPart checks that serve --help names what serve
// runs, with the default address of each.
func TestServeHelpNamesEveryPart(t *testing.T) {
	out := run(t, "serve", "--help")
	for _, want := range []string{"the CA", "xDS", "ext_authz", "sidecar-injection webhook", "/healthz, /readyz and /metrics", "bundle endpoint",
		"--listen-ca         127.0.0.1:15012", "--listen-authz      127.0.0.1:9191", "--listen-monitoring 127.0.0.1:15014",
		"--listen-bundle     127.0.0.1:15016", "--listen-injector   127.0.0.1:15017", "--listen-ui         127.0.0.1:15018"} {
		if !strings.Contains(out, want) {
			t.Errorf("serve --help does not say %q:\n%s", want, out)
		}
	}
}

// TestServeThatCannotListenCreatesNothing occupies one of serve's ports: the
// start fails naming the flag and the port, and the data directory, missing
// before, is still missing; an existing one is left as it was.
func TestServeThatCannotListenCreatesNothing(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct{ flag, what string }{
		{"--listen-ca", "the CA and xDS port"},
		{"--listen-monitoring", "the monitoring port"},
		{"--listen-bundle", "the bundle endpoint"},
		{"--listen-authz", "the ext_authz port"},
		{"--listen-ui", "the web UI"},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			dataDir := filepath.Join(t.TempDir(), "data")
			args := map[string]string{"--listen-ca": "127.0.0.1:0", "--listen-monitoring": "127.0.0.1:0", "--listen-bundle": "127.0.0.1:0", "--listen-authz": "127.0.0.1:0", "--listen-ui": "127.0.0.1:0"}
			args[tc.flag] = busy.Addr().String()
			argv := []string{"serve", "--data-dir", dataDir, "--policies", t.TempDir()}
			for f, a := range args {
				argv = append(argv, f, a)
			}
			_, stderr := refuse(t, argv...)
			if !strings.Contains(stderr, tc.flag+": "+tc.what) || !strings.Contains(stderr, busy.Addr().String()) {
				t.Errorf("the refusal does not name %s and %s:\n%s", tc.flag, busy.Addr(), stderr)
			}
			if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("a failed start left %s behind (%v):\n%s", dataDir, err, stderr)
			}
		})
	}
	t.Run("existing data dir", func(t *testing.T) {
		dataDir := filepath.Join(t.TempDir(), "data")
		startServe(t, dataDir).stop(t)
		before := tree(t, dataDir)
		_, stderr := refuse(t, "serve", "--data-dir", dataDir, "--listen-ca", busy.Addr().String(), "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "")
		if !strings.Contains(stderr, "--listen-ca") {
			t.Fatalf("the refusal does not name --listen-ca:\n%s", stderr)
		}
		if after := tree(t, dataDir); !maps.Equal(before, after) {
			t.Errorf("a failed start changed the data dir:\nbefore %v\nafter  %v", before, after)
		}
	})
}

// tree maps every file under dir but serve's lock file to a digest of its
// content.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() == "serve.lock" {
			return err
		}
		b, err := os.ReadFile(path)
		sum := sha256.Sum256(b)
		out[path] = hex.EncodeToString(sum[:])
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestSecondServeOnADataDirIsRefused starts serve, then a second one on the
// same data directory and other ports: it is refused with the first's PID,
// and the first serves on. Operator commands are not held off.
func TestSecondServeOnADataDirIsRefused(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	first := startServe(t, dataDir)
	code, stderr := refuse(t, "serve", "--data-dir", dataDir, "--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "")
	want := fmt.Sprintf("data dir %s is in use by trustmesh serve pid %d since ", dataDir, first.cmd.Process.Pid)
	if code == 0 || !strings.Contains(stderr, want) {
		t.Fatalf("the second serve exited %d with:\n%s\nwant it refused with %q", code, stderr, want)
	}
	run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", "spiffe://cluster.local/vm/beside")
	resp, err := http.Get("http://" + first.monitoring + "/readyz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the first serve is not ready after the refusal: %v", err)
	}
	resp.Body.Close()
	first.stop(t)
	// The lock ends with its holder: a new serve starts.
	killed := startServe(t, dataDir)
	// Nor does a holder that is killed leave it behind: the lock file
	// stays, naming a dead process, but the kernel dropped its lock.
	if err := killed.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = killed.cmd.Wait()
	startServe(t, dataDir).stop(t)
}

// freeListenAddrs sets every serve listener to a port the kernel picks, so
// that a test's serve, or its --validate, never binds a default port.
func freeListenAddrs() []string {
	var args []string
	for _, l := range []string{"ca", "monitoring", "bundle", "authz", "injector", "ui"} {
		args = append(args, "--listen-"+l, "127.0.0.1:0")
	}
	return args
}

// TestServeValidateChecksWhatStartChecks runs serve --validate over
// configurations a start refuses: each is refused (exit 2) naming the flag,
// and nothing is written.
func TestServeValidateChecksWhatStartChecks(t *testing.T) {
	emptyCerts := t.TempDir()
	badPolicies := t.TempDir()
	if err := os.WriteFile(filepath.Join(badPolicies, "p.yaml"), []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: NOPE}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	uncompiled := t.TempDir()
	if err := os.WriteFile(filepath.Join(uncompiled, "p.yaml"), []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext}\nspec: {action: CUSTOM, provider: {name: \"rego:envoy/authz/allow\"}, rules: [{}]}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	// --validate binds each listen address for a moment, as a start would:
	// on the default ports that could refuse a serve another package's test
	// starts on them at that moment (go test runs packages in parallel).
	// Each case's own flags come after these, and the last one given wins.
	ports := freeListenAddrs()
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"port out of range", []string{"--listen-ca", "127.0.0.1:99999"}, []string{"--listen-ca", "99999"}},
		{"no port", []string{"--listen-monitoring", "localhost"}, []string{"--listen-monitoring"}},
		{"injector port", []string{"--listen-injector", "127.0.0.1:70000"}, []string{"--listen-injector"}},
		{"missing policies", []string{"--policies", missing}, []string{"--policies", missing}},
		{"policies that do not parse", []string{"--policies", badPolicies}, []string{"--policies", "p.yaml"}},
		{"policies that do not compile", []string{"--policies", uncompiled}, []string{"--policies", "envoy/authz/allow"}},
		{"missing mesh", []string{"--mesh", missing}, []string{"--mesh", missing}},
		{"missing mesh config", []string{"--mesh-config", missing}, []string{"--mesh-config", missing}},
		{"missing cacerts", []string{"--cacerts", missing}, []string{"--cacerts", missing}},
		{"pkcs11 key", []string{"--cacerts", emptyCerts, "--ca-key-uri", "pkcs11:token=ca;object=signing"}, []string{"--ca-key-uri", "pkcs11"}},
		{"checkpoint key", []string{"--checkpoint-key-uri", "awskms:key-id=nope"}, []string{"--checkpoint-key-uri"}},
		{"trust domain", []string{"--trust-domain", "Not A Domain"}, []string{"--trust-domain"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dataDir := filepath.Join(t.TempDir(), "data")
			code, stderr := refuse(t, append(append([]string{"serve", "--validate", "--data-dir", dataDir}, ports...), tc.args...)...)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("the refusal does not say %q:\n%s", w, stderr)
				}
			}
			if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("serve --validate created %s", dataDir)
			}
		})
	}
	dataDir := filepath.Join(t.TempDir(), "data")
	if out := run(t, append([]string{"serve", "--validate", "--data-dir", dataDir, "--policies", t.TempDir(), "--mesh", t.TempDir()},
		ports...)...); !strings.Contains(out, "configuration is valid") {
		t.Fatalf("serve --validate of a good configuration printed %q", out)
	}
	if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("serve --validate created %s", dataDir)
	}
}

// TestServeValidateRefusesWhatStartRefuses gives serve --validate what a
// start refuses beyond the flags and the files they name: a data dir that
// is a file, held by a running serve, or of another trust domain; a port in
// use; a unix socket or a decision log in a missing directory. Each is
// refused with exit code 2, and nothing is created or changed. A start is
// refused too, and creates nothing.
func TestServeValidateRefusesWhatStartRefuses(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	aFile := filepath.Join(t.TempDir(), "afile")
	if err := os.WriteFile(aFile, []byte("not a directory\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	existing := filepath.Join(t.TempDir(), "data")
	startServe(t, existing).stop(t)
	held := filepath.Join(t.TempDir(), "data")
	holder := startServe(t, held)
	missing := filepath.Join(t.TempDir(), "missing", "dir")
	ports := freeListenAddrs()
	for _, tc := range []struct {
		name    string
		dataDir string // default: a missing one
		args    []string
		want    []string
		start   bool // a start is refused with the same words
	}{
		{"data dir is a file", aFile, nil, []string{"--data-dir", aFile + " is not a directory"}, true},
		{"data dir of another trust domain", existing, []string{"--trust-domain", "other.org"}, []string{"--trust-domain", `belongs to trust domain "cluster.local"`}, false},
		{"data dir held by a running serve", held, nil, []string{"--data-dir", fmt.Sprintf("is in use by trustmesh serve pid %d since ", holder.cmd.Process.Pid)}, true},
		{"port in use", "", []string{"--listen-ca", busy.Addr().String()}, []string{"--listen-ca: the CA and xDS port", busy.Addr().String()}, true},
		{"unix socket in a missing dir", "", []string{"--policies", t.TempDir(), "--listen-authz", "unix://" + missing + "/authz.sock"}, []string{"--listen-authz: the ext_authz port", missing}, true},
		{"decision log in a missing dir", "", []string{"--decision-log", missing + "/decisions.log"}, []string{"--decision-log", missing}, false},
		{"every group", "", []string{"--listen-monitoring", "127.0.0.1:99999", "--mesh", missing, "--policies", missing + "2"},
			[]string{"--listen-monitoring", "--mesh", "--policies", missing + "2"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dataDir := tc.dataDir
			if dataDir == "" {
				dataDir = filepath.Join(t.TempDir(), "data")
			}
			before := snapshot(t, dataDir)
			argv := append(append([]string{"--data-dir", dataDir}, ports...), tc.args...)
			code, stderr := refuse(t, append([]string{"serve", "--validate"}, argv...)...)
			if code != 2 {
				t.Errorf("serve --validate exit code %d, want 2", code)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("serve --validate does not say %q:\n%s", w, stderr)
				}
			}
			if after := snapshot(t, dataDir); !maps.Equal(before, after) {
				t.Errorf("serve --validate changed %s:\nbefore %v\nafter  %v", dataDir, before, after)
			}
			if _, err := os.Stat(filepath.Dir(missing)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("serve --validate created %s", filepath.Dir(missing))
			}
			if !tc.start {
				return
			}
			_, stderr = refuse(t, append([]string{"serve"}, argv...)...)
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("serve does not say %q:\n%s", w, stderr)
				}
			}
			if strings.Contains(stderr, "stop it") != strings.Contains(tc.name, "running serve") {
				t.Errorf("serve says to stop a serve that may not exist, or does not:\n%s", stderr)
			}
			if tc.dataDir == "" {
				if _, err := os.Stat(filepath.Dir(dataDir)); err != nil {
					t.Fatal(err)
				}
				if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("a failed start created %s", dataDir)
				}
			}
			if _, err := os.Stat(filepath.Dir(missing)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("a failed start created %s", filepath.Dir(missing))
			}
		})
	}
	holder.stop(t)
}

// TestFailedStartLeavesNothing fails a start on a data dir whose parents
// are missing too, once at the ext_authz unix socket and once at a busy
// port with a new decision log: neither the data dir, nor its parents, nor
// the decision log are left behind.
func TestFailedStartLeavesNothing(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for name, args := range map[string][]string{
		"unix socket": {"--policies", t.TempDir(), "--listen-authz", "unix://" + filepath.Join(t.TempDir(), "missing", "authz.sock"), "--listen-monitoring", "127.0.0.1:0"},
		"busy port":   {"--listen-monitoring", busy.Addr().String()},
	} {
		t.Run(name, func(t *testing.T) {
			top := filepath.Join(t.TempDir(), "pp")
			decisions := filepath.Join(t.TempDir(), "decisions.log")
			argv := append([]string{"serve", "--data-dir", filepath.Join(top, "qq", "data"), "--decision-log", decisions,
				"--listen-ca", "127.0.0.1:0", "--listen-bundle", ""}, args...)
			_, stderr := refuse(t, argv...)
			for _, path := range []string{top, decisions} {
				if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("a failed start left %s behind (%v):\n%s", path, err, stderr)
				}
			}
		})
	}
}

// snapshot is tree for a path that may be missing or a file: nil for a
// missing one, the file's digest for a file. It includes serve.lock.
func snapshot(t *testing.T, path string) map[string]string {
	t.Helper()
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if !fi.IsDir() {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		return map[string]string{path: hex.EncodeToString(sum[:])}
	}
	out := map[string]string{}
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		sum := sha256.Sum256(b)
		out[p] = hex.EncodeToString(sum[:]) + fmt.Sprint(d.Type())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestErrorsNameFlags checks that a refused setting is named by its flag,
// never by the Go field behind it.
func TestErrorsNameFlags(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		flag, not string
	}{
		{[]string{"serve", "--validate", "--trust-domain", "Not A Domain"}, "--trust-domain", "TrustDomain"},
		{[]string{"serve", "--validate", "--min-workload-ttl", "2h", "--max-workload-ttl", "1h"}, "--min-workload-ttl", "MinWorkloadTTL"},
		{[]string{"serve", "--validate", "--kubernetes", "sometimes"}, "--kubernetes", "Kubernetes:"},
		{[]string{"authz", "--listen", "127.0.0.1:0", "--policies", t.TempDir()}, "--insecure-plaintext", "InsecurePlaintext"},
	} {
		_, stderr := refuse(t, tc.args...)
		if !strings.Contains(stderr, tc.flag) || strings.Contains(stderr, tc.not) {
			t.Errorf("trustmesh %s:\n%s\nwant %s named, not %s", strings.Join(tc.args, " "), stderr, tc.flag, tc.not)
		}
	}
}

func TestVersion(t *testing.T) {
	if out := run(t, "version"); !strings.HasPrefix(out, "trustmesh ") {
		t.Fatalf("version printed %q", out)
	}
}

// TestListenDefaultsAreLoopback checks every listen flag's default of serve
// and of authz: each is on loopback, so that nothing is reachable from other
// hosts unless a flag says so.
func TestListenDefaultsAreLoopback(t *testing.T) {
	for _, cmd := range []*cobra.Command{newServeCmd(), newAuthzCmd()} {
		cmd.Flags().VisitAll(func(f *pflag.Flag) {
			if !strings.HasPrefix(f.Name, "listen") || f.DefValue == "" || f.DefValue == "off" {
				return
			}
			host, _, err := net.SplitHostPort(f.DefValue)
			if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
				t.Errorf("trustmesh %s --%s defaults to %q, not a loopback address", cmd.Name(), f.Name, f.DefValue)
			}
		})
	}
}

// TestOfflinePolicyRefusalSpeaksOfNoStart gives trustmesh policy check and
// compile policies that do not parse: the refusal names the file and does
// not speak of a start, which these commands do not make.
func TestOfflinePolicyRefusalSpeaksOfNoStart(t *testing.T) {
	bad := t.TempDir()
	if err := os.WriteFile(filepath.Join(bad, "p.yaml"), []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: NOPE}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"policy", "check", "--policies", bad, "--request", "../../examples/policies/requests/productpage-get.json"},
		{"policy", "compile", "--policies", bad},
	} {
		_, stderr := refuse(t, args...)
		if !strings.Contains(stderr, "p.yaml") || strings.Contains(stderr, "start") {
			t.Errorf("trustmesh %s:\n%s\nwant p.yaml named and no start spoken of", strings.Join(args, " "), stderr)
		}
	}
}
