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
//
// (runtime prefixes cri-containerd-, containerd-, crio-, docker-). The part
// before the kubepods cgroup is ignored, so that nested nodes (kind) and
// paths relative to a cgroup namespace ("/../../kubepods...") parse. The pod
// UID is returned with dashes, lower case; containerID is "" for a process in
// the pod's own cgroup. A process in no pod's cgroup gets "", "" and no
// error. Hierarchies that name different pods or containers are an error.
func ParseCgroup(r io.Reader) (podUID, containerID string, err error) {
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
		pod, cid, err := parseCgroupPath(parts[2])
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

// parseCgroupPath finds the pod and container in one cgroup path.
func parseCgroupPath(path string) (podUID, containerID string, err error) {
	segs := strings.Split(path, "/")
	start := -1
	for i, s := range segs {
		if s == "kubepods" || strings.HasPrefix(s, "kubepods.") || strings.HasPrefix(s, "kubepods-") {
			start = i
			break
		}
	}
	if start < 0 {
		return "", "", nil
	}
	for i := start; i < len(segs); i++ {
		raw, ok := podSegment(segs[i])
		if !ok {
			continue
		}
		uid, ok := podUIDOf(raw)
		if !ok {
			return "", "", fmt.Errorf("%w: %q does not hold a pod UID", ErrMalformedCgroup, segs[i])
		}
		rest := segs[i+1:]
		if len(rest) > 0 && rest[len(rest)-1] == "" {
			rest = rest[:len(rest)-1] // a trailing slash
		}
		switch len(rest) {
		case 0:
			return uid, "", nil
		case 1:
			cid, ok := containerIDOf(rest[0])
			if !ok {
				return "", "", fmt.Errorf("%w: %q is not a container ID", ErrMalformedCgroup, rest[0])
			}
			return uid, cid, nil
		default:
			return "", "", fmt.Errorf("%w: %q: more than a container below pod %s", ErrMalformedCgroup, path, uid)
		}
	}
	return "", "", nil // a QoS cgroup (kubepods/burstable) or kubepods itself
}

// podSegment returns what follows "pod" in a cgroupfs ("pod<uid>") or
// systemd ("kubepods-burstable-pod<uid>.slice") pod segment.
func podSegment(s string) (string, bool) {
	if rest, ok := strings.CutPrefix(s, "pod"); ok {
		return rest, true
	}
	if strings.HasPrefix(s, "kubepods") && strings.HasSuffix(s, ".slice") {
		if i := strings.LastIndex(s, "-pod"); i >= 0 {
			return strings.TrimSuffix(s[i+len("-pod"):], ".slice"), true
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

// containerIDOf takes "<id>" (cgroupfs) or "<runtime>-<id>.scope" (systemd).
func containerIDOf(s string) (string, bool) {
	if scope, ok := strings.CutSuffix(s, ".scope"); ok {
		for _, p := range containerRuntimePrefixes {
			if id, ok := strings.CutPrefix(scope, p); ok {
				return hexID(id)
			}
		}
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
