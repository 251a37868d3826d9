package authzd

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestMonitoringCountsTheDecisionLog: with a monitoring address, the
// service serves /readyz and, on /metrics, the decision log's lines
// written and dropped and the decisions made, each decision counted once.
func TestMonitoringCountsTheDecisionLog(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyAdmin), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	mon := freeport.Addr(t)
	var dl bytes.Buffer // read only after Run returned
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, DecisionLog: &dl, Monitoring: mon})
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
	const n = 50
	for i := range n {
		path := "/ok"
		if i%5 == 0 {
			path = "/admin"
		}
		if _, err := client.Check(ctx, request(path), grpc.WaitForReady(true)); err != nil {
			t.Fatal(err)
		}
	}
	if code, _ := get(t, "http://"+mon+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d after serving, want 200", code)
	}
	want := []string{
		decisionlog.MetricWritten + " 50", decisionlog.MetricDropped + " 0",
		`trustmesh_authz_decisions_total{result="allow"} 40`, `trustmesh_authz_decisions_total{result="deny"} 10`,
	}
	var body string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var code int
		if code, body = get(t, "http://"+mon+"/metrics"); code != http.StatusOK {
			t.Fatalf("/metrics = %d", code)
		}
		missing := false
		for _, w := range want {
			missing = missing || !strings.Contains(body, w+"\n")
		}
		if !missing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics lacks one of %q:\n%s", want, body)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := bytes.Count(dl.Bytes(), []byte("\n")); got != n {
		t.Errorf("decision log has %d lines, want %d", got, n)
	}
	if _, err := net.Dial("tcp", mon); err == nil {
		t.Error("the monitoring port still answers after Run returned")
	}
}
