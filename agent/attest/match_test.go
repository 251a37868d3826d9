package attest

import "testing"

// TestMatchesWithoutProcess covers the selectors that need no process
// handle; netns and sha256 against real processes are in
// TestWorkloadsAttested.
func TestMatchesWithoutProcess(t *testing.T) {
	c := &Caller{PID: 42, UID: 1001, GID: 2002, Path: "/usr/bin/web",
		PodUID: "0d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6", HostMounts: true}
	tests := []struct {
		name string
		sel  []string
		want bool
	}{
		{"nil list", nil, false},
		{"empty list", []string{}, false},
		{"uid", []string{"unix:uid:1001"}, true},
		{"other uid", []string{"unix:uid:1002"}, false},
		{"uid with sign", []string{"unix:uid:+1001"}, false},
		{"uid with space", []string{"unix:uid: 1001"}, false},
		{"uid too big", []string{"unix:uid:4294968297"}, false},
		{"empty uid", []string{"unix:uid:"}, false},
		{"gid", []string{"unix:gid:2002"}, true},
		{"uid is not gid", []string{"unix:gid:1001"}, false},
		{"path", []string{"unix:path:/usr/bin/web"}, true},
		{"other path", []string{"unix:path:/usr/bin/web2"}, false},
		{"relative path", []string{"unix:path:usr/bin/web"}, false},
		{"pod", []string{"k8s:pod-uid:0d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6"}, true},
		{"other pod", []string{"k8s:pod-uid:9f8e7d6c-5b4a-4392-8170-fedcba987654"}, false},
		{"empty pod", []string{"k8s:pod-uid:"}, false},
		{"all of several", []string{"unix:uid:1001", "unix:gid:2002", "unix:path:/usr/bin/web"}, true},
		{"one of several fails", []string{"unix:uid:1001", "unix:gid:1"}, false},
		{"unknown type", []string{"unix:shell:/bin/sh"}, false},
		{"unknown type beside a match", []string{"unix:uid:1001", "k8s:ns:default"}, false},
		{"no prefix", []string{"1001"}, false},
		{"sha256 with no process", []string{"unix:sha256:" + "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12"}, false},
		{"upper-case sha256", []string{"unix:sha256:" + "AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12AB12"}, false},
		{"netns with no process", []string{"netns:blue"}, false},
		{"netns escaping its directory", []string{"netns:../blue"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := c.Matches(tc.sel); got != tc.want {
				t.Fatalf("Matches(%q) = %v, want %v", tc.sel, got, tc.want)
			}
		})
	}
	// A path in another mount namespace is that namespace's own, which
	// whoever made it chose (review15-sec F2).
	elsewhere := *c
	elsewhere.HostMounts = false
	for _, sel := range [][]string{{"unix:path:/usr/bin/web"}, {"unix:uid:1001", "unix:path:/usr/bin/web"}} {
		if elsewhere.Matches(sel) {
			t.Errorf("Matches(%q) in another mount namespace = true, want false", sel)
		}
	}
	if !elsewhere.Matches([]string{"unix:uid:1001", "unix:gid:2002"}) {
		t.Error("uid and gid did not match in another mount namespace")
	}
	var none *Caller
	if none.Matches([]string{"unix:uid:0"}) {
		t.Fatal("a nil Caller matched")
	}
	pod := &Caller{} // not in a pod
	if pod.Matches([]string{"k8s:pod-uid:"}) {
		t.Fatal("an empty pod UID selector matched a caller outside pods")
	}
}
