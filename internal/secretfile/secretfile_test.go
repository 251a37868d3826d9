package secretfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, dir, name string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("s3cret"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		t.Fatal(err)
	}
	return p
}

// TestReadOwnerOnly: a file that grants anything to group or others is
// refused, through a symlink too (as Kubernetes mounts Secrets).
func TestReadOwnerOnly(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0o600, 0o400} {
		p := write(t, dir, "ok-"+mode.String(), mode)
		if b, err := ReadOwnerOnly(p); err != nil || string(b) != "s3cret" {
			t.Errorf("mode %v: %q, %v", mode, b, err)
		}
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o620, 0o440} {
		p := write(t, dir, "bad-"+mode.String(), mode)
		_, err := ReadOwnerOnly(p)
		if err == nil || !strings.Contains(err.Error(), "chmod 600 "+p) {
			t.Errorf("mode %v: %v, want a refusal that says chmod 600", mode, err)
		}
		link := filepath.Join(dir, "link-"+mode.String())
		if err := os.Symlink(p, link); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadOwnerOnly(link); err == nil {
			t.Errorf("a symlink to a mode %v file was read", mode)
		}
	}
	if _, err := ReadOwnerOnly(dir); err == nil {
		t.Error("a directory was read")
	}
}

// TestOwnGroup: with OwnGroup, a file the process's own group may read
// (Kubernetes' root:FSGROUP 0440) is read; group write, others, or a
// group that is not the process's are still refused.
func TestOwnGroup(t *testing.T) {
	dir := t.TempDir()
	own := Options{OwnGroup: true}
	p := write(t, dir, "g", 0o440)
	if _, err := Read(p, own); err != nil {
		t.Errorf("0440 of the own group: %v", err)
	}
	for _, mode := range []os.FileMode{0o460, 0o444, 0o640 | 0o004} {
		if _, err := Read(write(t, dir, "b-"+mode.String(), mode), own); err == nil {
			t.Errorf("mode %v read with OwnGroup", mode)
		}
	}
	if os.Geteuid() == 0 {
		// root can give a file to a group it is not in.
		q := write(t, dir, "other", 0o440)
		if err := os.Chown(q, -1, 54321); err != nil {
			t.Fatal(err)
		}
		if _, err := Read(q, own); err == nil {
			t.Error("0440 of a foreign group read with OwnGroup")
		}
	}
}

// TestOwnedByAnotherUser: a 0600 file that another user owns is that
// user's to read, so it is refused; one this process's user owns is read.
// Changing a file's owner needs root, which CI has.
func TestOwnedByAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("giving a file to another user needs root")
	}
	p := write(t, t.TempDir(), "pin", 0o600)
	if _, err := Read(p, Options{}); err != nil {
		t.Fatalf("a file of this process's user: %v", err)
	}
	if err := os.Chown(p, 12345, 12345); err != nil {
		t.Fatal(err)
	}
	_, err := Read(p, Options{OwnGroup: true})
	if err == nil || !strings.Contains(err.Error(), "owned by user 12345") {
		t.Fatalf("a file of user 12345 read by root: %v, want refused naming its owner", err)
	}
}
