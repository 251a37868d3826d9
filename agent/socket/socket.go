// Package socket serves the agent's gRPC services on a unix domain socket
// whose file permissions decide who may call: owner-only (0600) by default,
// or owner and one group (0660); or, for a server that tells its callers
// apart by attesting them (the node agent), any local user (0666).
//
// The socket file appears at its path already restricted: it is bound in a
// fresh private directory beside the path, restricted there, and renamed into
// place. While serving, the socket's directory is watched: if the socket file
// is removed, it is recreated at once; if something else takes its path, Run
// returns ErrReplaced, so the agent exits with a clear error instead of
// serving on a socket no workload can reach.
package socket

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"github.com/fsnotify/fsnotify"
)

// Errors Run returns.
var (
	// ErrReplaced: another file took the socket's path while serving.
	ErrReplaced = errors.New("socket: socket path was taken over by another file")
	// ErrInUse: another process already serves on the path.
	ErrInUse = errors.New("socket: another process is listening on the socket path")
)

// Server is what serves on the socket; *grpc.Server is one. Serve is called
// once per listener, again whenever the socket is recreated.
type Server interface {
	Serve(net.Listener) error
	Stop()
}

// Config configures a Socket.
type Config struct {
	// Path is where the socket file lives.
	Path string
	// GID, when not negative, is the group allowed to connect; the socket
	// is then 0660 instead of 0600.
	GID int
	// AnyUser makes the socket connectable by every local user (0666), as
	// SPIRE's agent socket is: only for a server that attests each caller
	// and answers it accordingly. It excludes GID.
	AnyUser bool
	Server  Server
	Logger  *slog.Logger
	// Recreated, if set, is called after the socket was recreated.
	Recreated func()
}

// Socket serves Server on the unix socket at Path.
type Socket struct {
	cfg Config
}

// New checks cfg and returns a socket. Nothing is created until Run.
func New(cfg Config) (*Socket, error) {
	if cfg.Path == "" {
		return nil, errors.New("socket: Path is required")
	}
	if cfg.Server == nil {
		return nil, errors.New("socket: Server is required")
	}
	if cfg.AnyUser && cfg.GID >= 0 {
		return nil, errors.New("socket: AnyUser and a GID exclude each other")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Path = filepath.Clean(cfg.Path)
	return &Socket{cfg: cfg}, nil
}

// Mode returns the permissions the socket file gets.
func (s *Socket) Mode() fs.FileMode {
	if s.cfg.AnyUser {
		return 0o666
	}
	if s.cfg.GID >= 0 {
		return 0o660
	}
	return 0o600
}

type served struct {
	gen int
	err error
}

// Run creates the socket and serves on it until ctx ends, recreating the
// socket file if it is removed. On return the server is stopped and the
// socket file removed, if it is still this one.
func (s *Socket) Run(ctx context.Context) error {
	dir := filepath.Dir(s.cfg.Path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if err := checkStale(s.cfg.Path); err != nil {
		return err
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("socket: watch %s: %w", dir, err)
	}
	defer w.Close()
	if err := w.Add(dir); err != nil {
		return fmt.Errorf("socket: watch %s: %w", dir, err)
	}

	lis, info, err := s.listen()
	if err != nil {
		return err
	}
	gen := 0
	results := make(chan served, 1)
	serve := func(l net.Listener, g int) {
		go func() { results <- served{g, s.cfg.Server.Serve(l)} }()
	}
	serve(lis, gen)
	pending := 1 // Serve calls not yet returned
	s.cfg.Logger.Info("serving on unix socket", "path", s.cfg.Path, "mode", s.Mode().String())

	defer func() {
		s.cfg.Server.Stop()
		for ; pending > 0; pending-- {
			<-results
		}
		if cur, err := os.Lstat(s.cfg.Path); err == nil && os.SameFile(cur, info) {
			_ = os.Remove(s.cfg.Path)
		}
	}()

	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r := <-results:
			pending--
			if r.gen != gen {
				continue // the listener we closed to recreate the socket
			}
			return fmt.Errorf("socket: serve: %w", r.err)
		case err := <-w.Errors:
			return fmt.Errorf("socket: watch %s: %w", dir, err)
		case _, ok := <-w.Events:
			if !ok {
				return fmt.Errorf("socket: watch %s ended", dir)
			}
			cur, err := os.Lstat(s.cfg.Path)
			switch {
			case err == nil && os.SameFile(cur, info):
				continue
			case err == nil:
				return fmt.Errorf("%w: %s", ErrReplaced, s.cfg.Path)
			case !errors.Is(err, fs.ErrNotExist):
				return fmt.Errorf("socket: %w", err)
			}
			s.cfg.Logger.Warn("socket file was removed; recreating it", "path", s.cfg.Path)
			_ = lis.Close()
			if lis, info, err = s.recreate(w); err != nil {
				return err
			}
			gen++
			serve(lis, gen)
			pending++
			if s.cfg.Recreated != nil {
				s.cfg.Recreated()
			}
		}
	}
}

// recreate makes the socket again after its file was removed. A directory
// being removed at the same time (rm -rf of the socket's directory) can pull
// the ground from under one attempt, so a few are made.
func (s *Socket) recreate(w *fsnotify.Watcher) (*net.UnixListener, fs.FileInfo, error) {
	dir := filepath.Dir(s.cfg.Path)
	var err error
	for range 5 {
		if err = os.MkdirAll(dir, 0o755); err != nil {
			continue
		}
		// Watching the directory again covers its own removal; adding an
		// existing watch is harmless.
		if err = w.Add(dir); err != nil {
			continue
		}
		var (
			lis  *net.UnixListener
			info fs.FileInfo
		)
		if lis, info, err = s.listen(); err == nil {
			return lis, info, nil
		}
	}
	return nil, nil, fmt.Errorf("socket: recreate %s: %w", s.cfg.Path, err)
}

// listen binds the socket in a private directory beside Path, restricts it,
// and renames it into place, so it is never reachable with looser
// permissions.
func (s *Socket) listen() (*net.UnixListener, fs.FileInfo, error) {
	tmpDir, err := os.MkdirTemp(filepath.Dir(s.cfg.Path), ".sock-")
	if err != nil {
		return nil, nil, fmt.Errorf("socket: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("socket: listen: %w", err)
	}
	lis.SetUnlinkOnClose(false) // the file moves; Run removes it
	fail := func(err error) (*net.UnixListener, fs.FileInfo, error) {
		_ = lis.Close()
		return nil, nil, fmt.Errorf("socket: %w", err)
	}
	if s.cfg.GID >= 0 && !s.cfg.AnyUser {
		if err := os.Lchown(tmp, -1, s.cfg.GID); err != nil {
			return fail(err)
		}
	}
	if err := os.Chmod(tmp, s.Mode()); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, s.cfg.Path); err != nil {
		return fail(err)
	}
	info, err := os.Lstat(s.cfg.Path)
	if err != nil {
		return fail(err)
	}
	return lis, info, nil
}

// checkStale refuses a path that holds anything but a socket nobody listens
// on. A socket left by an agent that died is replaced.
func checkStale(path string) error {
	info, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if info.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket: %s exists and is not a socket", path)
	}
	conn, err := net.Dial("unix", path)
	if err == nil {
		conn.Close()
		return fmt.Errorf("%w: %s", ErrInUse, path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket: probe %s: %w", path, err)
	}
	return nil
}
