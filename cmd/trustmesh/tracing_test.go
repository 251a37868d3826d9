package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/trustmesh/trustmesh/internal/freeport"
)

// withEnv is the test's environment without OTEL_ variables, plus kv.
func withEnv(kv ...string) []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "OTEL_") {
			env = append(env, e)
		}
	}
	return append(env, kv...)
}

// TestTracingEnvironmentIsChecked: serve --validate and authz refuse
// tracing variables they cannot honour, with exit code 2, naming the
// variable. TestAuthzTracesToConsoleAndFlushesAtExit starts with a good
// one.
func TestTracingEnvironmentIsChecked(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		args []string
		want string
	}{
		{[]string{"OTEL_TRACES_EXPORTER=jaeger"}, []string{"serve", "--validate", "--data-dir", filepath.Join(t.TempDir(), "d")}, "OTEL_TRACES_EXPORTER"},
		{[]string{"OTEL_TRACES_EXPORTER=otlp", "OTEL_EXPORTER_OTLP_PROTOCOL=http/json"}, []string{"authz", "--insecure-plaintext", "--listen", "127.0.0.1:0", "--policies", t.TempDir()}, "OTEL_EXPORTER_OTLP_PROTOCOL"},
	} {
		var stderr bytes.Buffer
		cmd := exec.Command(binary, tc.args...)
		cmd.Env, cmd.Stderr = withEnv(tc.env...), &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v with %v: %v, want exit 2 naming %s:\n%s", tc.args, tc.env, err, tc.want, stderr.String())
		}
	}
}

// TestAuthzTracesToConsoleAndFlushesAtExit runs trustmesh authz with
// OTEL_TRACES_EXPORTER=console, sends a Check carrying a W3C context in
// its metadata, stops the process, and finds the ext_authz.Check span in
// the caller's trace on stderr: the span was batched, and exit flushed it.
func TestAuthzTracesToConsoleAndFlushesAtExit(t *testing.T) {
	addr := freeport.Addr(t)
	var stderr syncBuffer
	cmd := exec.Command(binary, "authz", "--insecure-plaintext", "--listen", addr, "--policies", t.TempDir(), "--decision-log", "")
	// A batch delay far longer than the test: only the flush at exit
	// writes the span.
	cmd.Env = withEnv("OTEL_TRACES_EXPORTER=console", "OTEL_BSP_SCHEDULE_DELAY=600000")
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := authv3.NewAuthorizationClient(conn)
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/a/sa/a", Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/b/sa/b"},
		Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/", Host: "b"}},
	}}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := client.Check(cctx, req, grpc.WaitForReady(true))
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer from trustmesh authz: %v\n%s", err, stderr.String())
		}
	}
	if strings.Contains(stderr.String(), `"ext_authz.Check"`) {
		t.Fatal("the span was exported before exit; the test cannot see the flush")
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("trustmesh authz: %v\n%s", err, stderr.String())
	}
	out := stderr.String()
	for _, want := range []string{`"Name":"ext_authz.Check"`, `"TraceID":"4bf92f3577b34da6a3ce929d0e0e4736"`, `"authz.decision"`, `"trustmesh"`} {
		if !strings.Contains(out, want) {
			t.Errorf("stderr lacks %s:\n%s", want, out)
		}
	}
}
