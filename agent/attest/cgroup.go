package attest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
)

// ErrMalformedCgroup is returned by ParseCgroup for content that is not a
// /proc/PID/cgroup file or names a pod in a form that is not Kubernetes'.
var ErrMalformedCgroup = errors.New("attest: malformed cgroup")

// ParseCgroup returns the Kubernetes pod UID and container ID of a process
// from the content of its /proc/PID/cgroup, for cgroup v1 and v2 and for the
// kubelet's cgroupfs driver
//
//	/kubepods/burstable/pod<uid>/<container-id>
//	/kubepods/pod<uid>/<container-id>
//
// and its systemd driver
//
//	/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<container-id>.scope
//	/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod<uid>.slice/cri-containerd-<container-id>.scope (kind)
//
// (runtime prefixes cri-containerd-, containerd-, crio-, docker-; with
// cgroupfs, cri-o's "crio-<container-id>"), also as read from a private
// cgroup namespace ("/../../pod<uid>/<container-id>"). It is
// ParseCgroupUnder with no kubelet cgroup root.
func ParseCgroup(r io.Reader) (podUID, containerID string, err error) {
	return ParseCgroupUnder(r, "")
}

// ParseCgroupUnder is ParseCgroup for a kubelet whose --cgroup-root is
// kubeletRoot ("/kubelet" in kind; "" or "/" for the default).
//
// A pod is recognised only where the kubelet puts it, never by a name
// found deeper in someone else's subtree: anyone given a delegated subtree
// (a systemd user manager, rootless containers) can create
// .../kubepods/pod<uid> there, and pod UIDs are not secret. So, once the
// leading ".." segments are dropped (a path relative to the reader's cgroup
// namespace), the path must start with the kubepods cgroup: "kubepods" or
// "kubepods.slice" at the top, kubepods below kubeletRoot, or a systemd
// slice "<root>-kubepods.slice" at the one path systemd gives it
// (/kubelet.slice/kubelet-kubepods.slice, kind's), which no delegated
// subtree (always a service or scope) can be on. When the path climbed out
// of the reader's cgroup namespace (at least one ".."), it may instead
// start with a QoS cgroup (burstable, besteffort or their slices) or the
// pod cgroup itself: the reader is then a pod (the node agent in its
// private cgroup namespace on cgroup v2), and what it climbed to is one of
// its own ancestors, the kubepods tree, where only the kubelet makes
// cgroups; any other first component (user.slice, system.slice, ...) is no
// pod. The node agent must therefore not run inside a cgroup subtree
// delegated to others. After an optional QoS cgroup, the next component
// must be the pod's, and the one after it, if any, the container's; the
// first pod component decides, and cgroups a container makes below its own
// (pod-like names included) are the container's. The pod UID is returned
// with dashes, lower case; containerID is "" for a process in the pod's
// own cgroup. A process in no pod's cgroup gets "", "" and no error; so
// does a container's cgroup seen with no pod UID in its path (cri-o's
// "/../crio-<id>.scope" from a sibling's cgroup namespace), since entries
// name pods by UID. Hierarchies that name different pods or containers,
// and a component below the pod that is no container ID, are an error.
func ParseCgroupUnder(r io.Reader, kubeletRoot string) (podUID, containerID string, err error) {
	root := splitPath(kubeletRoot)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	lines := 0
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		lines++
		// hierarchy-ID:controller-list:cgroup-path; the path may hold ':'.
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || parts[0] == "" || !isDigits(parts[0]) {
			return "", "", fmt.Errorf("%w: line %q", ErrMalformedCgroup, line)
		}
		if !strings.HasPrefix(parts[2], "/") {
			return "", "", fmt.Errorf("%w: path %q is not absolute", ErrMalformedCgroup, parts[2])
		}
		pod, cid, err := parseCgroupPath(parts[2], root)
		if err != nil {
			return "", "", err
		}
		if pod == "" {
			continue
		}
		if podUID != "" && (pod != podUID || cid != containerID) {
			return "", "", fmt.Errorf("%w: hierarchies disagree: pod %s container %q and pod %s container %q",
				ErrMalformedCgroup, podUID, containerID, pod, cid)
		}
		podUID, containerID = pod, cid
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("attest: reading cgroup: %w", err)
	}
	if lines == 0 {
		return "", "", fmt.Errorf("%w: empty", ErrMalformedCgroup)
	}
	return podUID, containerID, nil
}

// splitPath returns a cgroup path's segments, without empty ones.
func splitPath(p string) []string {
	var segs []string
	for _, s := range strings.Split(p, "/") {
		if s != "" {
			segs = append(segs, s)
		}
	}
	return segs
}

// parseCgroupPath finds the pod and container in one cgroup path, anchored
// as ParseCgroupUnder says.
func parseCgroupPath(path string, root []string) (podUID, containerID string, err error) {
	segs := splitPath(path)
	up := 0
	for up < len(segs) && segs[up] == ".." {
		up++
	}
	segs = segs[up:]
	rest, ok := belowKubepods(segs, root)
	switch {
	case ok:
	case up > 0:
		rest = segs // climbed to an ancestor inside the kubepods tree
	default:
		return "", "", nil
	}
	if len(rest) > 0 && isQoS(rest[0]) {
		rest = rest[1:]
	}
	if len(rest) == 0 {
		return "", "", nil // kubepods or a QoS cgroup itself
	}
	raw, ok := podSegment(rest[0])
	if !ok {
		return "", "", nil // not the kubelet's layout: no pod
	}
	uid, ok := podUIDOf(raw)
	if !ok {
		return "", "", fmt.Errorf("%w: %q does not hold a pod UID", ErrMalformedCgroup, rest[0])
	}
	if len(rest) == 1 {
		return uid, "", nil
	}
	// The container's cgroup; cgroups a container makes below its own
	// (systemd or a runtime in the container, crun's "container") are
	// still the container's.
	cid, ok := containerIDOf(rest[1])
	if !ok {
		return "", "", fmt.Errorf("%w: %q is not a container ID", ErrMalformedCgroup, rest[1])
	}
	return uid, cid, nil
}

// belowKubepods returns what follows the kubepods cgroup when segs starts
// with it: at the top ("kubepods", "kubepods.slice"), below the operator's
// kubelet cgroup root, or, for a systemd kubelet cgroup root such as kind's
// "kubelet.slice", as the systemd slice "<root>-kubepods.slice" at the only
// path systemd gives it (/kubelet.slice/kubelet-kubepods.slice; a-b-kubepods.slice
// lives at /a.slice/a-b.slice/a-b-kubepods.slice), which no delegated
// subtree (always a service or scope unit) can be on.
func belowKubepods(segs, root []string) ([]string, bool) {
	switch {
	case len(segs) > 0 && isKubepods(segs[0]):
		return segs[1:], true
	case len(root) > 0 && len(segs) > len(root) && equal(segs[:len(root)], root) && isKubepods(segs[len(root)]):
		return segs[len(root)+1:], true
	}
	for i, s := range segs {
		if prefix, ok := strings.CutSuffix(s, "-kubepods.slice"); ok && prefix != "" {
			if equal(segs[:i], sliceAncestors(prefix)) {
				return segs[i+1:], true
			}
			return nil, false
		}
	}
	return nil, false
}

// sliceAncestors returns the cgroups of the systemd slice "<prefix>.slice"
// and its parent slices, from the top: "a-b" gives a.slice, a-b.slice.
func sliceAncestors(prefix string) []string {
	parts := strings.Split(prefix, "-")
	out := make([]string, len(parts))
	for i := range parts {
		out[i] = strings.Join(parts[:i+1], "-") + ".slice"
	}
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// isKubepods reports whether s is the kubelet's top cgroup: "kubepods"
// (cgroupfs), "kubepods.slice" or, below a systemd cgroup root
// "<root>.slice", "<root>-kubepods.slice".
func isKubepods(s string) bool {
	return s == "kubepods" || s == "kubepods.slice" || strings.HasSuffix(s, "-kubepods.slice")
}

// isQoS reports whether s is a QoS class cgroup: "besteffort", "burstable"
// (cgroupfs) or "[<root>-]kubepods-besteffort.slice" (systemd).
func isQoS(s string) bool {
	if s == "besteffort" || s == "burstable" {
		return true
	}
	for _, q := range []string{"kubepods-besteffort.slice", "kubepods-burstable.slice"} {
		if s == q || strings.HasSuffix(s, "-"+q) {
			return true
		}
	}
	return false
}

// podSegment returns what follows "pod" in a cgroupfs ("pod<uid>") or
// systemd ("[<root>-]kubepods[-<qos>]-pod<uid>.slice") pod segment.
func podSegment(s string) (string, bool) {
	if rest, ok := strings.CutPrefix(s, "pod"); ok {
		return rest, true
	}
	if name, ok := strings.CutSuffix(s, ".slice"); ok {
		if i := strings.LastIndex(name, "-pod"); i >= 0 {
			base := name[:i]
			base = strings.TrimSuffix(strings.TrimSuffix(base, "-besteffort"), "-burstable")
			if base == "kubepods" || strings.HasSuffix(base, "-kubepods") {
				return name[i+len("-pod"):], true
			}
		}
	}
	return "", false
}

// podUIDOf checks a UUID with dashes or (systemd) underscores and returns it
// with dashes, lower case.
func podUIDOf(s string) (string, bool) {
	if len(s) != 36 {
		return "", false
	}
	b := []byte(strings.ToLower(s))
	for i, c := range b {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' && c != '_' {
				return "", false
			}
			b[i] = '-'
		default:
			if !isHex(c) {
				return "", false
			}
		}
	}
	return string(b), true
}

// containerRuntimePrefixes are the systemd scope prefixes of container
// runtimes.
var containerRuntimePrefixes = []string{"cri-containerd-", "containerd-", "crio-", "docker-"}

// containerIDOf takes "<id>" (cgroupfs), "<runtime>-<id>" (cri-o with
// cgroupfs) or "<runtime>-<id>.scope" (systemd).
func containerIDOf(s string) (string, bool) {
	scope, isScope := strings.CutSuffix(s, ".scope")
	for _, p := range containerRuntimePrefixes {
		if id, ok := strings.CutPrefix(scope, p); ok {
			return hexID(id)
		}
	}
	if isScope {
		return "", false
	}
	return hexID(s)
}

func hexID(s string) (string, bool) {
	if len(s) != 64 {
		return "", false
	}
	for i := 0; i < len(s); i++ {
		if !isHex(s[i]) {
			return "", false
		}
	}
	return strings.ToLower(s), true
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
