package node

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// nodeCA is a CA that issues join tokens' identities (testca) and serves
// the fake node service, sharing one authority.
func nodeCA(t *testing.T, tokens map[string]spiffeid.ID) (*fakeCA, *testca.Server, string) {
	t.Helper()
	f := newFakeNodeService(t, clock.RealClock{})
	srv, err := testca.NewServer(testca.ServerConfig{
		Authority: f.a, Now: time.Now, Tokens: tokens,
		Register: func(g *grpc.Server) { cav1.RegisterNodeServiceServer(g, f) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	bundle := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(bundle, f.a.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	return f, srv, bundle
}

// runNode runs the node agent until the test ends; the channel yields
// Run's error once it returns.
func runNode(t *testing.T, cfg Config) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	returned := make(chan struct{})
	go func() {
		done <- Run(ctx, cfg)
		close(returned)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-returned:
		case <-time.After(10 * time.Second):
			buf := make([]byte, 1<<20)
			t.Error("Run did not return after cancel", string(buf[:runtime.Stack(buf, true)]))
		}
	})
	return done
}

// Off Kubernetes, a join token for spiffe://TD/node/NAME gives the node its
// SVID, which then authenticates every node-service call.
func TestRunOffKubernetesWithJoinToken(t *testing.T) {
	f, srv, bundle := nodeCA(t, map[string]spiffeid.ID{"join-a": nodeSVID})
	ids := workloadIDs(3)
	f.setEntries("r1", ids...)
	dir := t.TempDir()
	runNode(t, Config{
		NodeName: "node-a", CAAddress: srv.Addr(), CABundleFile: bundle, JoinToken: "join-a", Logger: slog.New(slog.DiscardHandler),
		StateDir: filepath.Join(dir, "state"), SocketPath: filepath.Join(dir, "node.sock"),
	})
	eventually(t, "the workloads issued over the node SVID", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.params == 3
	})
	if b, _, _ := f.counts(); b != 1 {
		t.Errorf("%d batch calls for 3 identities, want 1", b)
	}
	calls := srv.Calls()
	if len(calls) != 1 || calls[0].Token != "join-a" || calls[0].Issued != nodeSVID {
		t.Errorf("CreateCertificate calls = %+v, want one with the join token for %s", calls, nodeSVID)
	}
	// The state directory is written beside issuance, not before it.
	eventually(t, "the node SVID kept in the state directory", func() bool {
		_, err := os.Stat(filepath.Join(dir, "state", "svid.pem"))
		return err == nil
	})
}

// A join token for another identity than spiffe://TD/node/NAME stops the
// node agent with an error that says how to make the right one, and no
// node-service call is made with it.
func TestRunRefusesAnotherNodeIdentity(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/web")
	for _, tc := range []struct {
		name  string
		token spiffeid.ID
	}{
		{"workload identity", web},
		{"another node", spiffeid.RequireFromString("spiffe://cluster.local/node/node-b")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, srv, bundle := nodeCA(t, map[string]spiffeid.ID{"join": tc.token})
			dir := t.TempDir()
			done := runNode(t, Config{
				NodeName: "node-a", CAAddress: srv.Addr(), CABundleFile: bundle, JoinToken: "join", Logger: slog.New(slog.DiscardHandler),
				SocketPath: filepath.Join(dir, "node.sock"), StateDir: filepath.Join(dir, "state"),
			})
			var err error
			select {
			case err = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("the node agent kept running with another identity")
			}
			var idErr *NodeIDError
			if !errors.As(err, &idErr) || idErr.Got != tc.token {
				t.Fatalf("Run = %v, want a NodeIDError for %s", err, tc.token)
			}
			if !strings.Contains(err.Error(), "trustmesh ca token create --node node-a") {
				t.Errorf("the error does not say how to make the right token: %v", err)
			}
			if b, fetches, _ := f.counts(); b != 0 || fetches != 0 {
				t.Errorf("%d batch and %d fetch calls made with a wrong node identity", b, fetches)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	bundle := filepath.Join(t.TempDir(), "ca.pem")
	a := testca.New(t, td, time.Now())
	if err := os.WriteFile(bundle, a.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := Config{NodeName: "node-a", CAAddress: "ca:15012", CABundleFile: bundle, TokenFile: "/var/run/secrets/tokens/istio-ca"}
	if err := Validate(ok); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no node name", func(c *Config) { c.NodeName = "" }, "node name is required"},
		{"node name with a slash", func(c *Config) { c.NodeName = "a/b" }, "path segment"},
		{"no CA address", func(c *Config) { c.CAAddress = "" }, "CA address is required"},
		{"no bundle", func(c *Config) { c.CABundleFile = "" }, "CA bundle file is required"},
		{"two credentials", func(c *Config) { c.JoinToken = "x" }, "only one of"},
		{"no credential", func(c *Config) { c.TokenFile = "" }, "trustmesh ca token create --node NAME"},
		{"state dir on Kubernetes", func(c *Config) { c.StateDir = "/var/lib/x" }, "on Kubernetes"},
		{"negative TTL", func(c *Config) { c.CertTTL = -time.Second }, "negative certificate TTL"},
		{"bad key type", func(c *Config) { c.KeyType = "dsa" }, "unknown key type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ok
			tc.mod(&cfg)
			err := Validate(cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Off Kubernetes with a saved node SVID, no token is needed.
	cfg := ok
	cfg.TokenFile, cfg.StateDir = "", t.TempDir()
	if err := Validate(cfg); err != nil {
		t.Errorf("state dir alone refused: %v", err)
	}
}

// On Kubernetes the node sends its projected token, read afresh at every
// call (the kubelet rotates it), and holds no SVID of its own.
func TestRunOnKubernetesWithTokenFile(t *testing.T) {
	f, srv, bundle := nodeCA(t, nil)
	f.setEntries("r1", workloadIDs(2)...)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("stale-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	runNode(t, Config{
		NodeName: "node-a", CAAddress: srv.Addr(), CABundleFile: bundle, TokenFile: tokenFile,
		SocketPath: filepath.Join(dir, "node.sock"), SyncInterval: 50 * time.Millisecond,
		Logger: slog.New(slog.DiscardHandler),
	})
	time.Sleep(300 * time.Millisecond)
	if _, fetches, _ := f.counts(); fetches != 0 {
		t.Fatalf("%d fetches answered for a token the CA does not accept", fetches)
	}
	// The kubelet rewrites the file; the next call sends the new token.
	if err := os.WriteFile(tokenFile, []byte(nodeToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, "issuance with the rewritten token", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.params == 2
	})
	if calls := srv.Calls(); len(calls) != 0 {
		t.Errorf("the node asked for an SVID of its own on Kubernetes: %+v", calls)
	}
}
