package attest

import (
	"errors"
	"strings"
	"testing"
)

func TestParseCgroup(t *testing.T) {
	const (
		uid  = "2c48913c-b29f-11e7-9350-020968147796"
		uidU = "2c48913c_b29f_11e7_9350_020968147796"
		cid  = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
	)
	tests := []struct {
		name    string
		root    string // kubelet cgroup root
		in      string
		pod     string
		ctr     string
		wantErr bool
	}{
		{name: "v1 cgroupfs burstable",
			in:  "12:pids:/kubepods/burstable/pod" + uid + "/" + cid + "\n11:cpu,cpuacct:/kubepods/burstable/pod" + uid + "/" + cid + "\n",
			pod: uid, ctr: cid},
		{name: "v1 cgroupfs guaranteed", in: "4:memory:/kubepods/pod" + uid + "/" + cid, pod: uid, ctr: cid},
		{name: "v2 cgroupfs", in: "0::/kubepods/besteffort/pod" + uid + "/" + cid + "\n", pod: uid, ctr: cid},
		{name: "v2 systemd containerd",
			in:  "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope\n",
			pod: uid, ctr: cid},
		{name: "v2 systemd guaranteed crio",
			in:  "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/crio-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "v1 systemd docker",
			in:  "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/docker-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "containerd prefix", in: "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/containerd-" + cid + ".scope", pod: uid, ctr: cid},
		{name: "kind node, kubelet root", root: "/kubelet", in: "0::/kubelet/kubepods/burstable/pod" + uid + "/" + cid, pod: uid, ctr: cid},
		{name: "kind node, systemd kubelet root", root: "/kubelet.slice",
			in:  "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "kubelet root given, default layout still a pod", root: "/kubelet", in: "0::/kubepods/pod" + uid + "/" + cid, pod: uid, ctr: cid},
		{name: "relative to a cgroup namespace, cgroupfs guaranteed", in: "0::/../../../pod" + uid + "/" + cid, pod: uid, ctr: cid},
		{name: "relative to a cgroup namespace, other qos", in: "0::/../../../burstable/pod" + uid + "/" + cid, pod: uid, ctr: cid},
		{name: "relative to a cgroup namespace, kubepods", in: "0::/../../../../kubepods/besteffort/pod" + uid + "/" + cid, pod: uid, ctr: cid},

		// A pod's cgroup names made in someone else's subtree are no pod
		// (review15-sec F1: a systemd user manager's delegated subtree).
		{name: "spoof: under a user's delegated subtree",
			in: "0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod" + uid + "/" + cid + "\n"},
		{name: "spoof: v1 name=systemd hierarchy (the review's repro)",
			in: "12:pids:/user.slice/user-65534.slice\n1:name=systemd:/system.slice/r15sec-user@65534.service/kubepods/pod" + uid + "\n0::/\n"},
		{name: "spoof: systemd names under a user's subtree",
			in: "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope"},
		{name: "spoof: relative to a cgroup namespace, outside kubepods",
			in: "0::/../../../../user.slice/user-1000.slice/user@1000.service/kubepods/pod" + uid + "/" + cid},
		{name: "spoof: a kind-like prefix with no kubelet root given", in: "0::/docker/" + cid + "/kubelet/kubepods/burstable/pod" + uid + "/" + cid},
		{name: "spoof: a different kubelet root", root: "/kubelet", in: "0::/user.slice/kubelet/kubepods/pod" + uid + "/" + cid},
		{name: "spoof: a pod name at the top, not under kubepods", in: "0::/pod" + uid + "/" + cid},
		{name: "spoof: a systemd pod slice of another prefix", in: "0::/../../evil-pod" + uidU + ".slice"},
		// The first pod segment is the pod: what a container makes below
		// its own cgroup, pod-like names included, stays its own.
		{name: "a pod inside a container's own cgroup is the container's", in: "0::/../../../pod" + uid + "/" + cid + "/kubepods/pod3c48913c-b29f-11e7-9350-020968147796", pod: uid, ctr: cid},
		{name: "a pod name below a pod's container is that container's",
			in: "0::/kubepods/burstable/pod" + uid + "/" + cid + "/kubepods/besteffort/pod3c48913c-b29f-11e7-9350-020968147796/" + strings.Repeat("a", 64), pod: uid, ctr: cid},
		{name: "crun's container cgroup below the scope", in: "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/crio-" + cid + ".scope/container", pod: uid, ctr: cid},

		// review15-cor F2: real layouts (SPIRE's k8s workload attestor
		// fixtures and kind's defaults).
		{name: "kind on cgroup v2, no kubelet root given",
			in:  "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "kind on cgroup v2, guaranteed",
			in:  "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "kind on cgroup v2, from the agent's cgroup namespace, other qos",
			in:  "0::/../../../kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "kind on cgroup v2, from the agent's cgroup namespace, up to the top",
			in:  "0::/../../../../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "a deeper systemd kubelet root", in: "0::/a.slice/a-b.slice/a-b-kubepods.slice/a-b-kubepods-pod" + uidU + ".slice/crio-" + cid + ".scope", pod: uid, ctr: cid},
		{name: "cri-o with cgroupfs", in: "0::/kubepods/besteffort/pod" + uid + "/crio-" + cid, pod: uid, ctr: cid},
		{name: "docker with cgroupfs", in: "0::/kubepods/pod" + uid + "/docker-" + cid, pod: uid, ctr: cid},
		{name: "SPIRE systemd cri-o fixture (v1, hybrid v2 line)",
			in:  "12:hugetlb:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-" + cid + ".scope\n3:rdma:/\n1:systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/crio-" + cid + ".scope\n0::/system.slice/crio.service\n",
			pod: uid, ctr: cid},
		{name: "SPIRE systemd docker fixture, dashes in the slice",
			in:  "1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uid + ".slice/docker-" + cid + ".scope",
			pod: uid, ctr: cid},
		// A container's cgroup seen from a sibling's cgroup namespace names
		// no pod UID; entries are by pod UID, so it is no pod here.
		{name: "SPIRE cri-o cgroupns fixture: no pod UID", in: "0::/../crio-" + cid + ".scope"},
		{name: "spoof: a kind-like systemd root inside a user's subtree",
			in: "0::/user.slice/user-1000.slice/user@1000.service/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope"},
		{name: "spoof: a systemd kubepods slice off its systemd path",
			in: "0::/kubelet.slice/x.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope"},
		{name: "spoof: a systemd kubepods slice in a delegated subtree, from a cgroup namespace",
			in: "0::/../../../../user.slice/user-1000.slice/user@1000.service/app.slice/app-kubepods.slice/app-kubepods-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope"},
		{name: "relative to a cgroup namespace",
			in:  "0::/../../kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + cid + ".scope",
			pod: uid, ctr: cid},
		{name: "upper case normalised", in: "0::/kubepods/pod" + strings.ToUpper(uid) + "/" + strings.ToUpper(cid), pod: uid, ctr: cid},
		{name: "the pod's own cgroup", in: "0::/kubepods/burstable/pod" + uid, pod: uid},
		{name: "v1 with a non-pod v2 line", in: "12:pids:/kubepods/pod" + uid + "/" + cid + "\n0::/\n", pod: uid, ctr: cid},
		{name: "not a pod", in: "12:pids:/user.slice\n0::/user.slice/user-1000.slice/session-2.scope\n"},
		{name: "qos cgroup only", in: "0::/kubepods/burstable"},
		{name: "root", in: "0::/\n"},
		{name: "podman-like name outside kubepods", in: "0::/machine.slice/pod" + uid},

		{name: "empty", in: "", wantErr: true},
		{name: "no fields", in: "garbage\n", wantErr: true},
		{name: "non-numeric hierarchy", in: "x:pids:/kubepods/pod" + uid + "/" + cid, wantErr: true},
		{name: "relative path", in: "0::kubepods/pod" + uid + "/" + cid, wantErr: true},
		{name: "short pod uid", in: "0::/kubepods/pod2c48913c-b29f/" + cid, wantErr: true},
		{name: "bad pod uid separators", in: "0::/kubepods/pod2c48913c.b29f.11e7.9350.020968147796/" + cid, wantErr: true},
		{name: "short container id", in: "0::/kubepods/pod" + uid + "/abc123", wantErr: true},
		{name: "non-hex container id", in: "0::/kubepods/pod" + uid + "/" + strings.Repeat("z", 64), wantErr: true},
		{name: "unknown runtime scope", in: "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/rkt-" + cid + ".scope", wantErr: true},
		{name: "crio conmon", in: "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/crio-conmon-" + cid + ".scope", wantErr: true},
		{name: "a cgroup a container made below its own", in: "0::/kubepods/pod" + uid + "/" + cid + "/x", pod: uid, ctr: cid},
		{name: "crio conmon without scope", in: "0::/kubepods/pod" + uid + "/crio-conmon-" + cid, wantErr: true},
		{name: "hierarchies disagree on the pod",
			in:      "12:pids:/kubepods/pod" + uid + "/" + cid + "\n0::/kubepods/pod3c48913c-b29f-11e7-9350-020968147796/" + cid,
			wantErr: true},
		{name: "hierarchies disagree on the container",
			in:      "12:pids:/kubepods/pod" + uid + "/" + cid + "\n0::/kubepods/pod" + uid,
			wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod, ctr, err := ParseCgroupUnder(strings.NewReader(tc.in), tc.root)
			if tc.wantErr {
				if !errors.Is(err, ErrMalformedCgroup) {
					t.Fatalf("ParseCgroup = %q, %q, %v; want ErrMalformedCgroup", pod, ctr, err)
				}
				return
			}
			if err != nil || pod != tc.pod || ctr != tc.ctr {
				t.Fatalf("ParseCgroup = %q, %q, %v; want %q, %q", pod, ctr, err, tc.pod, tc.ctr)
			}
		})
	}
}

// FuzzParseCgroup: whatever the input, a pod UID returned is a canonical
// UUID and a container ID is 64 lower-case hex digits, and a container is
// never returned without its pod.
func FuzzParseCgroup(f *testing.F) {
	f.Add("0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961\n")
	f.Add("0::/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice/crio-9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961.scope\n")
	f.Add("12:pids:/user.slice\n0::/\n")
	f.Fuzz(func(t *testing.T, in string) {
		pod, ctr, err := ParseCgroup(strings.NewReader(in))
		if err != nil {
			if pod != "" || ctr != "" {
				t.Fatalf("error %v with pod %q container %q", err, pod, ctr)
			}
			return
		}
		if pod != "" {
			if canon, ok := podUIDOf(pod); !ok || canon != pod || strings.Contains(pod, "_") {
				t.Fatalf("pod UID %q is not canonical", pod)
			}
		}
		if ctr != "" {
			if pod == "" {
				t.Fatalf("container %q without a pod", ctr)
			}
			if id, ok := hexID(ctr); !ok || id != ctr {
				t.Fatalf("container ID %q is not 64 lower-case hex digits", ctr)
			}
		}
	})
}
