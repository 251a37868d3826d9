//go:build linux

package capture

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/trustmesh/trustmesh/agent/attest"
)

// PodNetns finds the network namespace of the Kubernetes pod podUID: it
// reads procRoot/PID/cgroup of every process (agent/attest.ParseCgroup) and
// returns procRoot/PID/ns/net of one in the pod, pinned (Netns.Dev, Ino) to
// the namespace it had when the PID was checked to be the pod's, both before
// and after opening it; later uses refuse a PID that another namespace's
// process took over.
//
// A process counts as the pod's only where ParseCgroupUnder recognises a pod
// (where the kubelet makes pod cgroups), so that a look-alike cgroup made
// elsewhere by someone else cannot offer its own namespace as the pod's.
//
// Limits: procRoot must be the node's /proc (the node agent runs with the
// host PID namespace); a pod is found only while one of its processes runs
// (its sandbox's pause process does from start to end); processes of the pod
// in different namespaces are an error, and so is a pod in the node agent's
// own namespace (hostNetwork, ErrHostNetwork). A scan reads every process's
// cgroup file.
func PodNetns(procRoot, podUID string) (Netns, error) {
	return PodNetnsUnder(procRoot, "", podUID)
}

// PodNetnsUnder is PodNetns on a node whose kubelet runs with --cgroup-root
// kubeletRoot (kind's "/kubelet"), as agent/attest.ParseCgroupUnder; give
// it the root the node agent attests callers with.
func PodNetnsUnder(procRoot, kubeletRoot, podUID string) (Netns, error) {
	want := strings.ToLower(strings.ReplaceAll(podUID, "_", "-"))
	if want == "" || strings.Trim(want, "0123456789abcdef-") != "" {
		return Netns{}, fmt.Errorf("capture: pod UID %q is not a Kubernetes UID", podUID)
	}
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return Netns{}, fmt.Errorf("capture: finding pod %s: %w", want, err)
	}
	var found Netns
	for _, e := range ents {
		if strings.Trim(e.Name(), "0123456789") != "" {
			continue
		}
		dir := filepath.Join(procRoot, e.Name())
		if !inPod(dir, kubeletRoot, want) {
			continue
		}
		ns := Netns{Path: filepath.Join(dir, "ns", "net")}
		f, err := ns.open()
		if err != nil {
			continue // gone meanwhile
		}
		var st unix.Stat_t
		err = unix.Fstat(int(f.Fd()), &st)
		f.Close()
		if err != nil || !inPod(dir, kubeletRoot, want) {
			continue
		}
		ns.Dev, ns.Ino = st.Dev, st.Ino
		if found.Ino == 0 {
			found = ns
		} else if found.Ino != ns.Ino || found.Dev != ns.Dev {
			return Netns{}, fmt.Errorf("capture: pod %s has processes in two network namespaces (%s, %s)", want, found.Path, ns.Path)
		}
	}
	if found.Ino == 0 {
		return Netns{}, fmt.Errorf("%w: pod %s under %s", ErrNoPod, want, procRoot)
	}
	var self unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		return Netns{}, fmt.Errorf("capture: the node agent's own network namespace: %w", err)
	}
	if self.Ino == found.Ino && self.Dev == found.Dev {
		return Netns{}, fmt.Errorf("%w: pod %s", ErrHostNetwork, want)
	}
	return found, nil
}

// inPod reports whether the process at dir is in pod uid's cgroup.
func inPod(dir, kubeletRoot, uid string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup"))
	if err != nil {
		return false
	}
	pod, _, err := attest.ParseCgroupUnder(bytes.NewReader(b), kubeletRoot)
	return err == nil && pod == uid
}
