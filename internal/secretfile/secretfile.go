// Package secretfile reads files that hold secrets (a PKCS#11 PIN, the
// web UI's token) only when no one but their owner can read them, as ssh
// does for private keys: a secret that others on the host can read is no
// longer a secret, so it is refused rather than used.
package secretfile

import (
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"
)

// Options relax the check for one known layout.
type Options struct {
	// OwnGroup also accepts a file its group may read (never write) when
	// that group is one of this process's own: Kubernetes mounts a
	// Secret with the pod's fsGroup as root:FSGROUP and adds g+r to its
	// defaultMode, so the pod's processes are its only readers.
	OwnGroup bool
}

// ReadOwnerOnly reads path, following symlinks (a Kubernetes Secret
// volume's files are symlinks), when it is a regular file that grants
// nothing to group or others.
func ReadOwnerOnly(path string) ([]byte, error) { return Read(path, Options{}) }

// Read reads path as ReadOwnerOnly does, with opts.
func Read(path string, opts Options) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	perm := fi.Mode().Perm()
	bad := perm & 0o077
	if opts.OwnGroup && perm&0o037 == 0 && ownGroup(fi) {
		bad = 0
	}
	if bad != 0 {
		return nil, fmt.Errorf("%s has mode %#o: others than its owner can access it, so it is not secret; run chmod 600 %s", path, perm, path)
	}
	if uid, ok := owner(fi); ok && uid != os.Geteuid() && uid != 0 {
		// Its owner, another user, can read it: only this process's
		// user or root (who can read anything anyway) may own a secret.
		return nil, fmt.Errorf("%s is owned by user %d, not by this process's user (%d) or root, so that user can read it", path, uid, os.Geteuid())
	}
	return io.ReadAll(f)
}

// owner returns fi's owner, when the platform says.
func owner(fi os.FileInfo) (int, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}

// ownGroup reports whether fi's group is one of this process's.
func ownGroup(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	if int(st.Gid) == os.Getegid() {
		return true
	}
	groups, err := os.Getgroups()
	return err == nil && slices.Contains(groups, int(st.Gid))
}
