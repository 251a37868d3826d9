package socket

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

type running struct {
	path      string
	sock      *Socket
	cancel    context.CancelFunc
	done      chan error
	recreated chan struct{}
}

func start(t *testing.T, path string, gid int) *running {
	t.Helper()
	return startConfig(t, Config{Path: path, GID: gid})
}

func startConfig(t *testing.T, cfg Config) *running {
	t.Helper()
	path := cfg.Path
	g := grpc.NewServer()
	healthpb.RegisterHealthServer(g, health.NewServer())
	r := &running{path: path, done: make(chan error, 1), recreated: make(chan struct{}, 10)}
	var err error
	cfg.Server = g
	cfg.Recreated = func() { r.recreated <- struct{}{} }
	r.sock, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- r.sock.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	waitFor(t, func() bool { return check(path) == nil }, "socket to serve")
	return r
}

// check makes one gRPC call over the socket.
func check(path string) error {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestPermissions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		gid     int
		anyUser bool
		mode    fs.FileMode
	}{
		{"owner only", -1, false, 0o600},
		{"owner and group", os.Getgid(), false, 0o660},
		{"any user", -1, true, 0o666},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "run", "agent.sock")
			startConfig(t, Config{Path: path, GID: tc.gid, AnyUser: tc.anyUser})
			info, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if info.Mode().Type() != fs.ModeSocket || info.Mode().Perm() != tc.mode {
				t.Fatalf("socket mode %s, want socket %s", info.Mode(), tc.mode)
			}
			if tc.gid >= 0 {
				if gid := int(info.Sys().(*syscall.Stat_t).Gid); gid != tc.gid {
					t.Fatalf("socket group %d, want %d", gid, tc.gid)
				}
			}
			entries, _ := os.ReadDir(filepath.Dir(path))
			if len(entries) != 1 {
				t.Fatalf("directory holds %d entries, want only the socket (temporary directory left behind?)", len(entries))
			}
		})
	}
}

func TestAnyUserExcludesGID(t *testing.T) {
	if _, err := New(Config{Path: "s", GID: 0, AnyUser: true, Server: grpc.NewServer()}); err == nil {
		t.Fatal("AnyUser with a GID accepted")
	}
}

func TestRemovedSocketIsRecreated(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	r := start(t, path, -1)
	for round := range 2 {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		select {
		case <-r.recreated:
		case err := <-r.done:
			t.Fatalf("round %d: Run returned %v instead of recreating the socket", round, err)
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: socket not recreated", round)
		}
		if err := check(path); err != nil {
			t.Fatalf("round %d: call over the recreated socket: %v", round, err)
		}
		info, err := os.Stat(path)
		if err != nil || info.Mode().Perm() != 0o600 {
			t.Fatalf("round %d: recreated socket %v, %v; want mode 0600", round, info, err)
		}
	}
}

func TestRemovedDirectoryIsRecreated(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	path := filepath.Join(dir, "agent.sock")
	r := start(t, path, -1)
	// rm -rf races with the agent recreating the socket inside the
	// directory; like an operator, repeat until it is gone once.
	for i := 0; ; i++ {
		err := os.RemoveAll(dir)
		if err == nil {
			break
		}
		if i == 100 {
			t.Fatalf("cannot remove %s: %v", dir, err)
		}
	}
	waitFor(t, func() bool {
		select {
		case err := <-r.done:
			r.done <- err // for the cleanup
			t.Fatalf("Run returned %v instead of recreating the socket", err)
		default:
		}
		return check(path) == nil
	}, "the socket to be recreated")
}

func TestReplacedSocketExitsWithError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	r := start(t, path, -1)
	tmp := path + ".other"
	if err := os.WriteFile(tmp, []byte("not a socket"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		if !errors.Is(err, ErrReplaced) {
			t.Fatalf("Run returned %v, want ErrReplaced", err)
		}
		r.done <- err // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("Run kept running after its socket path was taken over")
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "not a socket" {
		t.Fatal("Run removed a file that was not its socket")
	}
}

func TestStartRefusesOccupiedPath(t *testing.T) {
	t.Run("live socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "agent.sock")
		start(t, path, -1)
		err := runOnce(t, path)
		if !errors.Is(err, ErrInUse) {
			t.Fatalf("second agent on a live socket: %v, want ErrInUse", err)
		}
		if err := check(path); err != nil {
			t.Fatalf("first agent's socket broken by the second: %v", err)
		}
	})
	t.Run("regular file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "agent.sock")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := runOnce(t, path); err == nil {
			t.Fatal("Run replaced a regular file")
		}
	})
	t.Run("stale socket is replaced", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "agent.sock")
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
		start(t, path, -1)
	})
}

func runOnce(t *testing.T, path string) error {
	t.Helper()
	s, err := New(Config{Path: path, GID: -1, Server: grpc.NewServer()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.Run(ctx)
}

func TestCancelRemovesSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	r := start(t, path, -1)
	r.cancel()
	err := <-r.done
	r.done <- err
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v, want context.Canceled", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}
}
