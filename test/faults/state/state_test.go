// Package state_test corrupts the files trustmesh keeps on disk and starts
// the real binaries on them: each corruption must be refused at start with
// a message naming the file, and nothing in the data directory may change
// (no new CA, no new key, no new identity).
package state_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-state-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if bin, err = binary.BuildTrustmesh(dir, "FAULTS_TRUSTMESH"); err != nil {
		os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// serve runs trustmesh serve on dataDir until it exits or timeout passes,
// and returns whether it exited by itself, its exit code and its stderr.
func serve(t *testing.T, dataDir string, timeout time.Duration) (exited bool, code int, stderr string) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin, "serve", "--data-dir", dataDir, "--kubernetes", "off",
		"--listen-ca", freeport.Addr(t), "--listen-monitoring", freeport.Addr(t), "--listen-authz", "off",
		"--listen-bundle", "", "--listen-injector", "off", "--listen-ui", "off")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return true, code, out.String()
	case <-time.After(timeout):
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		return false, 0, out.String()
	}
}

// newDataDir starts serve on a fresh data directory until it serves, so
// that the directory holds a CA, its rotation state and a journal.
func newDataDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	exited, code, out := serve(t, dir, 8*time.Second)
	if exited || !strings.Contains(out, "trustmesh control plane serving") {
		t.Fatalf("serve on a fresh data dir: exited=%v code=%d\n%s", exited, code, out)
	}
	return dir
}

// hashTree returns the SHA-256 of every file under dir but the lock files
// and the journal's SQLite files (which opening may touch), by path.
func hashTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		base := filepath.Base(rel)
		if base == ".lock" || base == "serve.lock" || strings.HasPrefix(base, "journal.db") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		out[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func diffTrees(a, b map[string]string) []string {
	var d []string
	for k, v := range a {
		if b[k] != v {
			d = append(d, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			d = append(d, k+" (new)")
		}
	}
	sort.Strings(d)
	return d
}

func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	cmd := exec.Command("cp", "-a", src, dst)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
}

type corruption struct {
	name string
	do   func(path string) error
}

var corruptions = []corruption{
	{"empty", func(p string) error { return os.Truncate(p, 0) }},
	{"truncated", func(p string) error {
		info, err := os.Stat(p)
		if err != nil {
			return err
		}
		return os.Truncate(p, info.Size()/2)
	}},
	{"garbage", func(p string) error { return os.WriteFile(p, bytes.Repeat([]byte{0xde, 0xad, 0x00, '{'}, 64), 0o600) }},
	{"missing", os.Remove},
}

// TestCorruptCADataDir corrupts each file of the CA's data directory that
// the CA cannot rebuild, four ways, and starts serve on it: it must exit
// non-zero at once, say which file is wrong, and leave every file as it
// was: no new CA, no new checkpoint key.
func TestCorruptCADataDir(t *testing.T) {
	base := newDataDir(t)
	files := []struct {
		rel  string
		want string // what the refusal says, beside the file's name
	}{
		{rel: "ca/rotation.json", want: "restore the CA directory from a backup"},
		{rel: "ca/gen-1/ca-key.pem", want: "ca-key.pem"},
		{rel: "ca/gen-1/ca-cert.pem", want: "ca-cert.pem"},
		{rel: "ca/gen-1/cert-chain.pem", want: "cert-chain.pem"},
		{rel: "ca/gen-1/root-cert.pem", want: "root-cert.pem"},
		{rel: "ca/gen-1/root-key.pem", want: "root-key.pem"},
		{rel: "checkpoint-key.pem", want: "checkpoint-key.pem"},
		{rel: "journal.db", want: "journal"},
	}
	want := hashTree(t, base)
	for _, f := range files {
		for _, c := range corruptions {
			t.Run(f.rel+"/"+c.name, func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "data")
				copyTree(t, base, dir)
				if err := c.do(filepath.Join(dir, f.rel)); err != nil {
					t.Fatal(err)
				}
				before := hashTree(t, dir)
				// hashTree leaves the journal out, and sees no file that is
				// missing: the corrupted file itself must stay as it is.
				path := filepath.Join(dir, f.rel)
				had, _ := os.ReadFile(path)
				_, statBefore := os.Stat(path)
				exited, code, out := serve(t, dir, 15*time.Second)
				if !exited {
					t.Fatalf("serve ran on a data dir with %s %s\n%s", c.name, f.rel, out)
				}
				if code == 0 {
					t.Fatalf("serve exited 0 on a data dir with %s %s\n%s", c.name, f.rel, out)
				}
				if !strings.Contains(out, f.want) {
					t.Errorf("the refusal does not say %q:\n%s", f.want, out)
				}
				if d := diffTrees(before, hashTree(t, dir)); len(d) > 0 {
					t.Errorf("serve changed the data dir it refused: %v\n%s", d, out)
				}
				has, _ := os.ReadFile(path)
				if _, statAfter := os.Stat(path); (statBefore == nil) != (statAfter == nil) || !bytes.Equal(had, has) {
					t.Errorf("serve changed %s (%s) when it refused to start:\n%s", f.rel, c.name, out)
				}
			})
		}
	}
	if d := diffTrees(want, hashTree(t, base)); len(d) > 0 {
		t.Fatalf("the pristine copy changed: %v", d)
	}
}

// TestCorruptAgentState corrupts the agent's state directory and starts
// the agent on it: it must exit non-zero before it contacts any CA, name
// the file, and leave the state as it was, instead of enrolling again as a
// new identity.
func TestCorruptAgentState(t *testing.T) {
	base := newDataDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	caAddr := freeport.Addr(t)
	monAddr := freeport.Addr(t)
	srv := exec.CommandContext(ctx, bin, "serve", "--data-dir", base, "--kubernetes", "off",
		"--listen-ca", caAddr, "--listen-monitoring", monAddr, "--listen-authz", "off",
		"--listen-bundle", "", "--listen-injector", "off", "--listen-ui", "off")
	var srvOut bytes.Buffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Process.Signal(os.Interrupt); _ = srv.Wait() }()
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	waitFor(t, func() bool {
		out, err := exec.Command(bin, "ca", "bundle", "--data-dir", base).Output()
		return err == nil && os.WriteFile(bundle, out, 0o600) == nil
	})
	tok, err := exec.Command(bin, "ca", "token", "create", "--data-dir", base, "--spiffe-id", "spiffe://cluster.local/vm/db-1").Output()
	if err != nil {
		t.Fatalf("token create: %v", err)
	}
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, bytes.TrimSpace(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(t.TempDir(), "state")
	sock := filepath.Join(t.TempDir(), "agent.sock")
	agent := func(args ...string) *exec.Cmd {
		// No monitoring port: the default, 127.0.0.1:15024, is one that
		// other packages' agents may hold while this one runs.
		return exec.Command(bin, append([]string{"agent", "--ca-address", caAddr, "--ca-server-name", "localhost",
			"--ca-bundle", bundle, "--state-dir", stateDir, "--socket", sock, "--listen-monitoring", ""}, args...)...)
	}
	// Enrol once, so that the state directory holds an identity.
	first := agent("--join-token-file", tokFile)
	var firstOut bytes.Buffer
	first.Stdout, first.Stderr = &firstOut, &firstOut
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		_, err := os.Stat(filepath.Join(stateDir, "svid.pem"))
		return err == nil
	})
	_ = first.Process.Signal(os.Interrupt)
	_ = first.Wait()
	pristine := filepath.Join(t.TempDir(), "pristine")
	copyTree(t, stateDir, pristine)

	for _, f := range []string{"svid.pem", "bundle.pem"} {
		for _, c := range corruptions {
			if f == "svid.pem" && c.name == "missing" {
				continue // no identity saved: the agent enrols, as on its first start
			}
			t.Run(f+"/"+c.name, func(t *testing.T) {
				if err := os.RemoveAll(stateDir); err != nil {
					t.Fatal(err)
				}
				copyTree(t, pristine, stateDir)
				if err := c.do(filepath.Join(stateDir, f)); err != nil {
					t.Fatal(err)
				}
				before := hashTree(t, stateDir)
				cmd := agent()
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				cmd.Env = append(os.Environ(), "TRUSTMESH_JOIN_TOKEN=")
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				done := make(chan error, 1)
				go func() { done <- cmd.Wait() }()
				select {
				case err := <-done:
					if err == nil {
						t.Fatalf("the agent exited 0 on %s %s\n%s", c.name, f, out.String())
					}
				case <-time.After(15 * time.Second):
					_ = cmd.Process.Kill()
					<-done
					t.Fatalf("the agent ran on %s %s\n%s", c.name, f, out.String())
				}
				for _, w := range []string{filepath.Join(stateDir, f), "corrupt"} {
					if !strings.Contains(out.String(), w) {
						t.Errorf("the refusal does not say %q:\n%s", w, out.String())
					}
				}
				if d := diffTrees(before, hashTree(t, stateDir)); len(d) > 0 {
					t.Errorf("the agent changed the state it refused: %v", d)
				}
			})
		}
	}
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMissingCADirectory: a data directory whose journal holds issuances
// but whose CA directory is gone (deleted, or not restored with the
// journal) is refused at start, saying so, and serve creates no CA in its
// place: a new root minted there would silently replace the CA the
// journal's history vouches for.
func TestMissingCADirectory(t *testing.T) {
	base := newDataDir(t)
	dir := filepath.Join(t.TempDir(), "data")
	copyTree(t, base, dir)
	if err := os.RemoveAll(filepath.Join(dir, "ca")); err != nil {
		t.Fatal(err)
	}
	before := hashTree(t, dir)
	exited, code, out := serve(t, dir, 15*time.Second)
	if !exited || code == 0 {
		t.Fatalf("serve started on a data dir whose journal has history and whose CA is gone (exited=%v code=%d)\n%s", exited, code, out)
	}
	if !strings.Contains(out, "holds no CA") {
		t.Errorf("the refusal does not say the CA is missing:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca")); err == nil {
		t.Errorf("serve created a CA directory when it refused to start:\n%s", out)
	}
	if d := diffTrees(before, hashTree(t, dir)); len(d) > 0 {
		t.Errorf("serve changed the data dir it refused: %v\n%s", d, out)
	}
}
