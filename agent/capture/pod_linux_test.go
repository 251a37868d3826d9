//go:build linux

package capture

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// writableCgroup finds a cgroup hierarchy this process may make cgroups in.
func writableCgroup() string {
	for _, p := range []string{"/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && (st.Type == unix.CGROUP_SUPER_MAGIC || st.Type == unix.CGROUP2_SUPER_MAGIC) && unix.Access(p, unix.W_OK) == nil {
			return p
		}
	}
	return ""
}

// podProcess runs sleep in the network namespace name and in a pod cgroup
// of the kubelet's cgroupfs layout, at the top of the hierarchy root where
// the kubelet puts pods (a pod is recognised nowhere else), and ends it when
// the test ends. Only the cgroups it made are removed.
func podProcess(t *testing.T, root, name, uid string) *exec.Cmd {
	t.Helper()
	dir := filepath.Join(root, "kubepods", "burstable", "pod"+uid, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	var made []string
	for d := dir; d != root; d = filepath.Dir(d) {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			made = append(made, d)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range made {
			if err := os.Remove(d); err != nil {
				t.Errorf("removing cgroup %s: %v", d, err)
			}
		}
	})
	cmd := exec.Command("ip", "netns", "exec", name, "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	return cmd
}

// TestPodNetns: a real process in a pod cgroup and a network namespace is
// found, with the namespace pinned; gone, it is not found.
func TestPodNetns(t *testing.T) {
	requireRoot(t)
	root := writableCgroup()
	if root == "" {
		t.Fatal("no writable cgroup hierarchy under /sys/fs/cgroup to put a pod's process in")
	}
	n, name := newNetns(t)
	var b [16]byte
	rand.Read(b[:])
	uid := fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
	cmd := podProcess(t, root, name, uid)
	// ip netns exec enters the namespace before it runs sleep.
	want := nsInode(t, n.Path)
	var got Netns
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got, err = PodNetns("/proc", uid)
		if err == nil && got.Ino == want || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	if got.Ino != want || got.Path != fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid) {
		t.Fatalf("PodNetns = %+v, want /proc/%d/ns/net with inode %d", got, cmd.Process.Pid, want)
	}
	// The systemd driver's spelling of the UID names the same pod.
	if again, err := PodNetns("/proc", strings.ToUpper(strings.ReplaceAll(uid, "-", "_"))); err != nil || again.Ino != want {
		t.Errorf("PodNetns with the UID in underscores: %+v, %v", again, err)
	}
	if err := got.Do(func() error {
		if ino := nsInode(t, "/proc/thread-self/ns/net"); ino != want {
			return fmt.Errorf("in netns %d, want %d", ino, want)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := Install(context.Background(), got, DefaultRules()); err != nil {
		t.Fatal(err)
	}
	if s := saveAll(t, n); !strings.Contains(s, "-A OUTPUT -j TRUSTMESH_OUTPUT") {
		t.Errorf("Install through the pod's process did not reach its namespace:\n%s", s)
	}
	if _, err := PodNetns("/proc", "00000000-0000-0000-0000-000000000000"); !errors.Is(err, ErrNoPod) {
		t.Errorf("a pod without processes: %v, want ErrNoPod", err)
	}
	for _, bad := range []string{"", "../1", "pod with spaces"} {
		if _, err := PodNetns("/proc", bad); err == nil || errors.Is(err, ErrNoPod) {
			t.Errorf("UID %q: %v, want refused as malformed", bad, err)
		}
	}

	cmd.Process.Kill()
	cmd.Wait()
	if _, err := PodNetns("/proc", uid); !errors.Is(err, ErrNoPod) {
		t.Errorf("after its process ended: %v, want ErrNoPod", err)
	}
	if err := got.Do(func() error { return nil }); err == nil {
		t.Error("Do in the namespace of an ended process succeeded")
	}
}

// fakeProc makes procRoot/PID/cgroup naming pod uid and procRoot/PID/ns/net
// pointing at target.
func fakeProc(t *testing.T, procRoot string, pid int, uid, target string) string {
	t.Helper()
	return fakeProcAt(t, procRoot, pid, "/kubepods/besteffort/pod"+uid+"/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", target)
}

func fakeProcAt(t *testing.T, procRoot string, pid int, cgroup, target string) string {
	t.Helper()
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte("1:pids:"+cgroup+"\n0::/\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "ns", "net")
	os.Remove(link)
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	return link
}

// TestPodNetnsPinned: a Netns from PodNetns refuses a PID that now names
// another namespace, and pods in the node's namespace or in two are refused.
func TestPodNetnsPinned(t *testing.T) {
	requireRoot(t)
	a, _ := newNetns(t)
	b, _ := newNetns(t)
	const uid = "11111111-2222-4333-8444-555555555555"
	proc := t.TempDir()
	link := fakeProc(t, proc, 100, uid, a.Path)
	fakeProc(t, proc, 7, "99999999-2222-4333-8444-555555555555", b.Path) // another pod
	os.WriteFile(filepath.Join(proc, "self"), nil, 0o644)                // not a PID
	got, err := PodNetns(proc, uid)
	if err != nil {
		t.Fatal(err)
	}
	if got.Path != link || got.Ino != nsInode(t, a.Path) {
		t.Fatalf("PodNetns = %+v, want %s pinned to %s", got, link, a.Path)
	}
	if err := got.Do(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	// The PID now names another namespace.
	fakeProc(t, proc, 100, uid, b.Path)
	ctx := context.Background()
	if err := got.Do(func() error { return nil }); err == nil || !strings.Contains(err.Error(), "no longer") {
		t.Errorf("Do after the PID changed namespace: %v", err)
	}
	if _, err := got.Listen(ctx, "tcp", ":15008", 0); err == nil {
		t.Error("Listen after the PID changed namespace succeeded")
	}
	if err := Install(ctx, got, DefaultRules()); err == nil {
		t.Error("Install after the PID changed namespace succeeded")
	}
	if s := saveAll(t, b); strings.Contains(s, "TRUSTMESH") {
		t.Errorf("rules reached the other namespace:\n%s", s)
	}

	// One pod, two namespaces.
	fakeProc(t, proc, 101, uid, a.Path)
	if _, err := PodNetns(proc, uid); err == nil || !strings.Contains(err.Error(), "two network namespaces") {
		t.Errorf("a pod in two namespaces: %v", err)
	}
	// A hostNetwork pod.
	host := t.TempDir()
	fakeProc(t, host, 100, uid, "/proc/self/ns/net")
	if _, err := PodNetns(host, uid); !errors.Is(err, ErrHostNetwork) {
		t.Errorf("a pod in the node's namespace: %v, want ErrHostNetwork", err)
	}
}

// TestPodNetnsKubeletRoot: a pod is found only where the kubelet puts pod
// cgroups: below the given kubelet cgroup root, not in a look-alike subtree.
func TestPodNetnsKubeletRoot(t *testing.T) {
	requireRoot(t)
	a, _ := newNetns(t)
	const uid = "21111111-2222-4333-8444-555555555555"
	proc := t.TempDir()
	fakeProcAt(t, proc, 100, "/kubelet/kubepods/burstable/pod"+uid, a.Path)
	if got, err := PodNetnsUnder(proc, "/kubelet", uid); err != nil || got.Ino != nsInode(t, a.Path) {
		t.Errorf("below kubelet root /kubelet: %+v, %v", got, err)
	}
	if _, err := PodNetns(proc, uid); !errors.Is(err, ErrNoPod) {
		t.Errorf("with the default kubelet root: %v, want ErrNoPod", err)
	}
	// Someone's delegated subtree naming the pod offers its own namespace.
	fake := t.TempDir()
	fakeProcAt(t, fake, 200, "/user.slice/user-1000.slice/user@1000.service/kubepods/pod"+uid, a.Path)
	if _, err := PodNetns(fake, uid); !errors.Is(err, ErrNoPod) {
		t.Errorf("a look-alike pod cgroup: %v, want ErrNoPod", err)
	}
}
