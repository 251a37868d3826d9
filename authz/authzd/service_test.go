package authzd

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/internal/run"
)

const denyAdmin = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
`

func request(path string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/foo/sa/web"},
		Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: path}},
	}}
}

func TestRunServesAndStops(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyAdmin), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	var dl bytes.Buffer // read only after Run returned
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, DecisionLog: &dl, RedactPaths: []string{`^/(ok)$`}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := authv3.NewAuthorizationClient(conn)
	for _, tt := range []struct {
		path string
		want codes.Code
	}{{"/admin", codes.PermissionDenied}, {"/ok", codes.OK}} {
		// WaitForReady: the socket appears once the first load succeeded.
		resp, err := client.Check(ctx, request(tt.path), grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != tt.want {
			t.Errorf("%s: %v, want %v", tt.path, got, tt.want)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := bytes.Count(dl.Bytes(), []byte("\n")); n != 2 {
		t.Errorf("decision log has %d lines, want 2", n)
	}
	if !bytes.Contains(dl.Bytes(), []byte(`"path":"/REDACTED"`)) || bytes.Contains(dl.Bytes(), []byte(`"path":"/ok"`)) {
		t.Errorf("the decision log did not redact /ok:\n%s", dl.Bytes())
	}
}

func TestRunFailsOnABrokenFirstLoad(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte("kind: Nope\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Run(context.Background()); !errors.Is(err, source.ErrRefused) {
		t.Fatalf("Run = %v, want ErrRefused", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the server listened before a policy set loaded: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no source", Config{Address: "unix:///tmp/x.sock"}},
		{"plaintext tcp", Config{Address: "127.0.0.1:0", PolicyDir: "."}},
		{"unsigned bundles required", Config{Address: "unix:///tmp/x.sock", Bundles: []source.BundleConfig{{Path: ".", RequireSignature: true}}}},
		{"unsigned bundles on Kubernetes", Config{Address: "unix:///tmp/x.sock", OnKubernetes: true, Bundles: []source.BundleConfig{{Path: "."}}}},
		{"bad path redaction pattern", Config{Address: "unix:///tmp/x.sock", PolicyDir: ".", DecisionLog: &bytes.Buffer{}, RedactPaths: []string{"("}}},
		{"bad path redaction pattern without a log", Config{Address: "unix:///tmp/x.sock", PolicyDir: ".", RedactPaths: []string{"("}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.cfg); err == nil {
				t.Fatal("New accepted an invalid config")
			}
		})
	}
}

// panicWriter is a decision log destination whose every write panics.
type panicWriter struct{}

func (panicWriter) Write([]byte) (int, error) { panic("disk on fire") }

// TestRunTurnsAPanicIntoAnError: a component that panics (here the decision
// log's writer) stops the service with an error naming the panic, rather
// than taking the process down.
func TestRunTurnsAPanicIntoAnError(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyAdmin), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, DecisionLog: panicWriter{}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- svc.Run(context.Background()) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The check is answered; logging it panics in the log's own task.
	_, _ = authv3.NewAuthorizationClient(conn).Check(ctx, request("/admin"), grpc.WaitForReady(true))
	select {
	case err := <-done:
		var pe *run.PanicError
		if !errors.As(err, &pe) || pe.Value != "disk on fire" {
			t.Fatalf("Run = %v, want the panic as a *run.PanicError", err)
		}
	case <-ctx.Done():
		t.Fatal("Run did not stop after a component panicked")
	}
}

// TestStandaloneServiceCountsItsSnapshots: `trustmesh authz`, which reads
// its own policy directory, exports the feed's metrics as serve does.
func TestStandaloneServiceCountsItsSnapshots(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyAdmin), 0o644); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	sock := filepath.Join(t.TempDir(), "authz.sock")
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	select {
	case <-svc.ready:
	case <-time.After(10 * time.Second):
		t.Fatal("no policy set loaded")
	}
	if got := counterValue(t, reg, "trustmesh_policy_snapshots_total"); got != 1 {
		t.Fatalf("trustmesh_policy_snapshots_total = %v, want 1", got)
	}
}

// counterValue is the value of the registry's one counter name.
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
