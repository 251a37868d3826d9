package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
)

// TestDemoAmbientRefusals: `trustmesh demo --ambient` exits 2 with a clear
// error when it is not root (run here as nobody when the test is root), and
// when given the flags of the other demo that it does not take.
func TestDemoAmbientRefusals(t *testing.T) {
	run := func(t *testing.T, cred *syscall.Credential, bin string, args ...string) (string, int) {
		t.Helper()
		var out bytes.Buffer
		cmd := exec.Command(bin, append([]string{"demo", "--ambient"}, args...)...)
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.Dir = os.TempDir()
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		err := cmd.Run()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("trustmesh demo --ambient: %v", err)
		}
		code := 0
		if ee != nil {
			code = ee.ExitCode()
		}
		return out.String(), code
	}

	t.Run("OtherDemoFlags", func(t *testing.T) {
		out, code := run(t, nil, binary, "--mesh", t.TempDir())
		if code != 2 || !strings.Contains(out, "--ambient writes its own mesh") {
			t.Fatalf("exit %d, want 2 naming the flag:\n%s", code, out)
		}
	})
	t.Run("NotRoot", func(t *testing.T) {
		if runtime.GOOS != "linux" {
			t.Skip("demo --ambient runs on Linux only")
		}
		bin, cred := binary, (*syscall.Credential)(nil)
		if os.Geteuid() == 0 {
			// nobody must reach the binary: a copy in a directory anyone
			// may read.
			dir, err := os.MkdirTemp("", "trustmesh-demo-ambient-bin-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			if err := os.Chmod(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			bin = filepath.Join(dir, "trustmesh")
			copyFile(t, binary, bin)
			cred = &syscall.Credential{Uid: 65534, Gid: 65534}
		}
		work := filepath.Join(t.TempDir(), "work")
		out, code := run(t, cred, bin, "--work-dir", work)
		if code != 2 || !strings.Contains(out, "demo --ambient needs root") {
			t.Fatalf("exit %d, want 2 saying it needs root:\n%s", code, out)
		}
		if _, err := os.Stat(work); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the refused demo made its work directory (%v)", err)
		}
	})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
