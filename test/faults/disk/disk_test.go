// Package disk_test fills the disk under the real `trustmesh serve`'s data
// directory (the SQLite journal, the default) and frees it again.
package disk_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

// tmpfsSize bounds the data directory: room for the CA, its keys and a
// fresh journal, no more.
const tmpfsSize = "16m"

// exitNoMount is the exit code of the wrapper when mount refuses: the test
// then skips.
const exitNoMount = 97

// tmpfsServe is `trustmesh serve` run in a mount namespace of its own
// (unshare -m, private propagation) on a tmpfs of tmpfsSize mounted at its
// data directory there. The tmpfs exists only in that namespace and
// vanishes with it, whatever becomes of the test. A shell holds the
// namespace until the test closes its standard input, so that the data
// directory can still be read once serve has stopped.
type tmpfsServe struct {
	*serveProc
	dataDir string
	pid     int // serve's
	nsPid   int // the shell's, in the namespace
	stdin   io.Closer
	lines   <-chan string
}

func startInTmpfs(t *testing.T, dataDir string) *tmpfsServe {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); skipping the full-disk fault")
	}
	p := &serveProc{ca: freeport.Addr(t), monitoring: freeport.Addr(t)}
	script := `dir=$1 size=$2 bin=$3; shift 3
mount -t tmpfs -o "size=$size,mode=0700" tmpfs "$dir" || exit ` + fmt.Sprint(exitNoMount) + `
"$bin" serve --data-dir "$dir" "$@" </dev/null &
echo "pid $!"
wait $!
echo "exit $?"
read _`
	p.cmd = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", dataDir, tmpfsSize, bin,
		"--listen-ca", p.ca, "--listen-monitoring", p.monitoring, "--listen-bundle", "", "--listen-ui", "off",
		"--kubernetes", "off", "--decision-log", "")
	p.cmd.Stderr = &p.stderr
	stdin, err := p.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ts := &tmpfsServe{serveProc: p, dataDir: dataDir, nsPid: p.cmd.Process.Pid, stdin: stdin}
	lines := make(chan string, 4)
	ts.lines = lines
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	t.Cleanup(func() {
		if ts.pid != 0 {
			_ = syscall.Kill(ts.pid, syscall.SIGKILL)
		}
		stdin.Close()
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	})
	select {
	case l, ok := <-lines:
		if !ok {
			err := p.cmd.Wait()
			var ee *exec.ExitError
			if errors.As(err, &ee) && (ee.ExitCode() == exitNoMount || strings.Contains(p.stderr.String(), "unshare failed")) {
				t.Skipf("mounting a tmpfs in a new mount namespace is refused here: %s", p.stderr.String())
			}
			t.Fatalf("unshare exited: %v\n%s", err, p.stderr.String())
		}
		if _, err := fmt.Sscanf(l, "pid %d", &ts.pid); err != nil {
			t.Fatalf("the wrapper printed %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the wrapper did not start serve")
	}
	deadline := time.Now().Add(45 * time.Second)
	for {
		resp, err := http.Get("http://" + p.monitoring + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return ts
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trustmesh serve did not become ready:\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// inside is the data directory as the test's own file operations reach it.
// SQLite resolves /proc/PID/root to /, so commands that open the journal
// run in the namespace instead (cli).
func (ts *tmpfsServe) inside() string { return fmt.Sprintf("/proc/%d/root%s", ts.nsPid, ts.dataDir) }

// cli runs a trustmesh command in serve's mount namespace.
func (ts *tmpfsServe) cli(t *testing.T, args ...string) string {
	t.Helper()
	return runProg(t, "nsenter", append([]string{"-t", fmt.Sprint(ts.nsPid), "-m", "--", bin}, args...)...)
}

// stopServe stops serve with SIGTERM and waits for a clean exit; the
// namespace and its tmpfs stay until release.
func (ts *tmpfsServe) stopServe(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(ts.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-ts.lines:
		if l != "exit 0" {
			t.Fatalf("trustmesh serve: %s\n%s", l, ts.stderr.String())
		}
		ts.pid = 0
	case <-time.After(30 * time.Second):
		t.Fatal("trustmesh serve did not stop")
	}
}

// copyOut copies the data directory out of the namespace once serve has
// stopped, and returns the copy.
func (ts *tmpfsServe) copyOut(t *testing.T) string {
	t.Helper()
	dst := t.TempDir()
	src := ts.inside()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// fill writes a file into dir until the file system is full, and returns
// its path.
func fill(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err = f.Write(buf); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the data directory: %v; want ENOSPC", err)
	}
	// The last pages, a few bytes at a time.
	for _, err := f.Write(buf[:512]); err == nil; _, err = f.Write(buf[:512]) {
	}
	return path
}

// TestFullDataDirectory fills the tmpfs that holds serve's data directory
// while workloads renew: issuance is refused with Unavailable once the
// journal cannot grow, the journal is not corrupted (audit verify, and
// every certificate received is in it), and once the filler is deleted the
// same process issues again.
func TestFullDataDirectory(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := startInTmpfs(t, dataDir)
	dir := p.inside()
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(p.cli(t, "ca", "bundle", "--data-dir", dataDir))) {
		t.Fatal("ca bundle printed no certificate")
	}
	var ws []*workload
	for i := range 3 {
		w := newWorkload()
		tok := strings.TrimSpace(p.cli(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", fmt.Sprintf("spiffe://cluster.local/vm/disk-%d", i)))
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := w.request(ctx, p.ca, roots, tok)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}

	stop := make(chan struct{})
	out := make(chan outcome, 1<<16)
	wg := burst(p.ca, roots, ws, stop, out)
	var got []outcome
	collect := func(until func() bool, max time.Duration) {
		deadline := time.After(max)
		for !until() {
			select {
			case o := <-out:
				got = append(got, o)
			case <-deadline:
				return
			}
		}
	}
	count := func(from time.Time, ok bool) (n int) {
		for _, o := range got {
			if (o.err == nil) == ok && o.at.After(from) {
				n++
			}
		}
		return n
	}
	collect(func() bool { return count(time.Time{}, true) >= 20 }, 30*time.Second)
	filled := time.Now()
	filler := fill(t, dir)
	// SQLite's write-ahead log reuses the room it already has: commits may
	// go on until it must grow. Then every one is refused.
	collect(func() bool { return count(filled, false) >= 20 }, 30*time.Second)
	if n := count(filled, false); n < 20 {
		t.Fatalf("with the disk full, %d refusals in 30 s; want at least 20", n)
	}
	freed := time.Now()
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	collect(func() bool { return count(freed, true) >= 20 }, 30*time.Second)
	close(stop)
	wg.Wait()
	close(out)
	for o := range out {
		got = append(got, o)
	}

	var refused int
	var lastRefusal time.Time
	for _, o := range got {
		if o.err == nil {
			continue
		}
		refused++
		lastRefusal = o.at
		if o.at.Before(filled) {
			t.Errorf("before the disk filled a renewal failed: %v", o.err)
		} else if status.Code(o.err) != codes.Unavailable {
			t.Errorf("with the disk full a renewal failed with %v; want Unavailable", o.err)
		}
	}
	after := count(freed, true)
	if after < 20 {
		t.Fatalf("%d renewals after the disk was freed; want 20 without restarting trustmesh\n%s", after, p.stderr.String())
	}
	if !strings.Contains(p.stderr.String(), "journal: the database is unavailable") {
		t.Errorf("serve's log never says the journal is unavailable")
	}

	// The journal once serve has stopped: the command an auditor runs, in
	// the namespace, and every certificate received, on a copy.
	p.stopServe(t)
	if out := p.cli(t, "audit", "verify", "--data-dir", dataDir); !strings.Contains(out, "OK") {
		t.Fatalf("audit verify printed %q", out)
	}
	cp := p.copyOut(t)
	pub, err := os.ReadFile(filepath.Join(cp, "checkpoint.pub"))
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(context.Background(), journal.Config{DSN: filepath.Join(cp, "journal.db"), Existing: true,
		VerifierKey: strings.TrimSpace(string(pub))})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := store.Integrity(); err != nil {
		t.Fatal(err)
	}
	for _, o := range got {
		if o.err != nil {
			continue
		}
		iss, err := store.LookupIssuance(context.Background(), o.cert.serial)
		if err != nil {
			t.Errorf("certificate %s was received but: %v", o.cert.serial, err)
		} else if iss.CertSHA256 != o.cert.sha256 {
			t.Errorf("certificate %s: the journal records SHA-256 %s, the client received %s", o.cert.serial, iss.CertSHA256, o.cert.sha256)
		}
	}
	t.Logf("disk filled after %d renewals; %d refusals, the last %s after it filled; %d renewals once freed; every certificate journalled",
		count(time.Time{}, true)-count(filled, true), refused, lastRefusal.Sub(filled).Round(time.Millisecond), after)
}
