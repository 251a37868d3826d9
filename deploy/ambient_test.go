package deploy_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
	"github.com/trustmesh/trustmesh/injector"
)

func ambientValues() map[string]any {
	return map[string]any{"ambient": map[string]any{"enabled": true}}
}

func daemonSet(t *testing.T, objs []*unstructured.Unstructured, name string) *appsv1.DaemonSet {
	t.Helper()
	o := find(objs, "DaemonSet", name)
	if o == nil {
		t.Fatalf("no DaemonSet %s", name)
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
		t.Fatal(err)
	}
	return &ds
}

func controlPlaneArgs(t *testing.T, objs []*unstructured.Unstructured) []string {
	t.Helper()
	var d appsv1.Deployment
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(find(objs, "Deployment", "trustmesh").Object, &d); err != nil {
		t.Fatal(err)
	}
	return d.Spec.Template.Spec.Containers[0].Args
}

// flagValues returns every value of --name in args.
func flagValues(args []string, name string) []string {
	var vals []string
	for _, a := range args {
		if f, v, ok := strings.Cut(a, "="); ok && f == name {
			vals = append(vals, v)
		}
	}
	return vals
}

// mountOf returns the volume mounted at the directory holding file, and
// the mount.
func mountOf(spec *corev1.PodSpec, c *corev1.Container, file string) (*corev1.Volume, *corev1.VolumeMount) {
	for i, m := range c.VolumeMounts {
		if m.MountPath != path.Dir(file) {
			continue
		}
		for j, v := range spec.Volumes {
			if v.Name == m.Name {
				return &spec.Volumes[j], &c.VolumeMounts[i]
			}
		}
	}
	return nil, nil
}

// TestRenderAmbient: the ambient profile adds the node agent's DaemonSet
// as the issue describes it (host PID namespace, its own service account
// and projected CA token, its node's name, the host socket directory the
// injector mounts into opted-in pods, the bootstrap bundle, a read-only
// root, SYS_PTRACE, every node), the node's L4 proxy (--proxy, the
// Service's ext_authz port, the node's IP from the downward API, and the
// capabilities it needs: NET_ADMIN and SYS_ADMIN), and has the control
// plane trust that account for delegation; without the profile, none of
// it; with ambient.proxy false, no proxy and SYS_PTRACE alone.
func TestRenderAmbient(t *testing.T) {
	objs, err := deploy.Render(deploy.RenderOptions{Namespace: "mesh-prod", Values: ambientValues()})
	if err != nil {
		t.Fatal(err)
	}
	ds := daemonSet(t, objs, "trustmesh-node")
	spec := &ds.Spec.Template.Spec
	if ds.Namespace != "mesh-prod" {
		t.Errorf("DaemonSet in %q, want the release namespace", ds.Namespace)
	}
	if !spec.HostPID {
		t.Error("no hostPID: the socket's PIDs would not be the callers'")
	}
	if spec.HostNetwork {
		t.Error("hostNetwork: the agent needs only the pod network to reach the CA")
	}
	if spec.ServiceAccountName != "trustmesh-node" {
		t.Errorf("service account %q", spec.ServiceAccountName)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("the API token is mounted: the agent needs no Kubernetes API")
	}
	sa := find(objs, "ServiceAccount", "trustmesh-node")
	if sa == nil || sa.GetNamespace() != "mesh-prod" {
		t.Fatal("no ServiceAccount trustmesh-node in the release namespace")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers", len(spec.Containers))
	}
	c := &spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "node" {
		t.Fatalf("args %v, want trustmesh node", c.Args)
	}
	one := func(flag string) string {
		t.Helper()
		v := flagValues(c.Args, flag)
		if len(v) != 1 {
			t.Fatalf("%s given %d times in %v", flag, len(v), c.Args)
		}
		return v[0]
	}

	// The node's name from the downward API.
	if one("--node-name") != "$(NODE_NAME)" {
		t.Errorf("--node-name %q", one("--node-name"))
	}
	var nodeName bool
	for _, e := range c.Env {
		nodeName = nodeName || e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
	}
	if !nodeName {
		t.Errorf("NODE_NAME is not spec.nodeName: %+v", c.Env)
	}
	if got := one("--ca-address"); got != "trustmesh.mesh-prod.svc:15012" {
		t.Errorf("--ca-address %q", got)
	}

	// The token: projected, with the CA's audience.
	v, _ := mountOf(spec, c, one("--token-file"))
	if v == nil || v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("--token-file %s is not in a projected token volume: %+v", one("--token-file"), v)
	}
	tok := v.Projected.Sources[0].ServiceAccountToken
	if tok.Audience != "istio-ca" || tok.Path != path.Base(one("--token-file")) {
		t.Errorf("token %+v", tok)
	}

	// The bundle the control plane publishes.
	v, _ = mountOf(spec, c, one("--ca-bundle-file"))
	if v == nil || v.ConfigMap == nil || v.ConfigMap.Name != injector.RootCertConfigMap || path.Base(one("--ca-bundle-file")) != injector.RootCertKey {
		t.Errorf("--ca-bundle-file %s is not the %s ConfigMap's %s: %+v", one("--ca-bundle-file"), injector.RootCertConfigMap, injector.RootCertKey, v)
	}

	// The socket, where the injector mounts it from.
	if one("--socket") != injector.NodeSocketPath {
		t.Errorf("--socket %s, but the injector gives pods %s", one("--socket"), injector.NodeSocketPath)
	}
	v, m := mountOf(spec, c, one("--socket"))
	if v == nil || v.HostPath == nil || v.HostPath.Path != injector.NodeSocketDir ||
		v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
		t.Errorf("--socket %s is not in the host directory %s (DirectoryOrCreate): %+v", one("--socket"), injector.NodeSocketDir, v)
	} else if m.ReadOnly {
		t.Error("the socket directory is read-only: the agent cannot create the socket")
	}

	// The proxy: the ext_authz port of the Service, the node's IP.
	if got := flagValues(c.Args, "--proxy"); len(got) != 0 || !slices.Contains(c.Args, "--proxy") {
		t.Errorf("args %v: no --proxy", c.Args)
	}
	if got := one("--authz-address"); got != "trustmesh.mesh-prod.svc:9191" {
		t.Errorf("--authz-address %q", got)
	}
	if svc := find(objs, "Service", "trustmesh"); svc == nil || !strings.Contains(fmt.Sprint(svc.Object["spec"]), "port:9191") {
		t.Errorf("the trustmesh Service has no port 9191 for --authz-address")
	}
	if one("--node-ip") != "$(NODE_IP)" {
		t.Errorf("--node-ip %q", one("--node-ip"))
	}
	// Every $(VAR) in the arguments is defined: Kubernetes leaves an
	// undefined one as it is.
	for _, a := range c.Args {
		for _, m := range regexp.MustCompile(`\$\(([A-Z_]+)\)`).FindAllStringSubmatch(a, -1) {
			if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == m[1] }) {
				t.Errorf("argument %s: no env %s", a, m[1])
			}
		}
	}
	if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	}) {
		t.Errorf("NODE_IP is not status.hostIP: %+v", c.Env)
	}

	// The least privilege: root for /proc, SYS_PTRACE, and for the proxy
	// NET_ADMIN and SYS_ADMIN (TestNodeProxyCapabilities shows why).
	sc := c.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("the root filesystem is writable")
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged, or may escalate")
	}
	if caps := nodeCapabilities(t, c); !slices.Equal(caps, []string{"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}) {
		t.Errorf("capabilities %v, want NET_ADMIN, SYS_ADMIN and SYS_PTRACE", caps)
	}
	if c.ReadinessProbe == nil || c.LivenessProbe != nil {
		t.Error("want a readiness probe and no liveness probe: a restart loses every key")
	}

	// Every node.
	if !slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool {
		return t.Operator == corev1.TolerationOpExists && t.Key == "" && t.Effect == ""
	}) {
		t.Errorf("tolerations %+v do not tolerate every taint", spec.Tolerations)
	}

	// No Kubernetes RBAC: entries come from the CA.
	for _, o := range objs {
		if k := o.GetKind(); k != "RoleBinding" && k != "ClusterRoleBinding" {
			continue
		}
		var b rbacv1.RoleBinding // a ClusterRoleBinding's subjects convert alike
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &b); err != nil {
			t.Fatal(err)
		}
		for _, s := range b.Subjects {
			if s.Name == "trustmesh-node" {
				t.Errorf("%s %s binds trustmesh-node", o.GetKind(), o.GetName())
			}
		}
	}

	// The control plane trusts that account, in the release's namespace.
	if got := flagValues(controlPlaneArgs(t, objs), "--trusted-node-accounts"); !slices.Equal(got, []string{"mesh-prod/trustmesh-node"}) {
		t.Errorf("--trusted-node-accounts %v, want [mesh-prod/trustmesh-node]", got)
	}

	// The injector is called for ambient pods, which it gives no sidecar
	// (or the node's socket), never in system namespaces, failing closed.
	mwc := webhookConfig(t, objs)
	var names []string
	for _, w := range mwc.Webhooks {
		names = append(names, w.Name)
		if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Fail {
			t.Errorf("webhook %s does not fail closed", w.Name)
		}
		if !neverInjects(w, "kube-system", "kube-public", "kube-node-lease", "mesh-prod") {
			t.Errorf("webhook %s may be called for system namespaces", w.Name)
		}
	}
	if want := []string{"namespace.inject.trustmesh.io", "ambient-namespace.inject.trustmesh.io", "trustmesh-ambient-namespace.inject.trustmesh.io",
		"ambient-object.inject.trustmesh.io", "trustmesh-ambient-object.inject.trustmesh.io"}; !slices.Equal(names, want) {
		t.Errorf("webhooks %v, want %v", names, want)
	}

	notes, err := deploy.Notes(deploy.RenderOptions{Namespace: "mesh-prod", Values: ambientValues()})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(notes, "istio.io/dataplane-mode=ambient") || !strings.Contains(notes, "mesh-prod must allow the privileged Pod Security level") {
		t.Errorf("NOTES.txt does not say how to use ambient mode and what it needs:\n%s", notes)
	}

	// Without the proxy: identities only, SYS_PTRACE alone.
	noProxy, err := deploy.Render(deploy.RenderOptions{Namespace: "mesh-prod", Values: map[string]any{"ambient": map[string]any{"enabled": true, "proxy": false}}})
	if err != nil {
		t.Fatal(err)
	}
	c = &daemonSet(t, noProxy, "trustmesh-node").Spec.Template.Spec.Containers[0]
	if caps := nodeCapabilities(t, c); !slices.Equal(caps, []string{"SYS_PTRACE"}) {
		t.Errorf("without the proxy: capabilities %v, want SYS_PTRACE alone", caps)
	}
	for _, f := range []string{"--proxy", "--authz-address", "--node-ip"} {
		if slices.ContainsFunc(c.Args, func(a string) bool { return a == f || strings.HasPrefix(a, f+"=") }) {
			t.Errorf("without the proxy: %s in %v", f, c.Args)
		}
	}

	// Off by default: no DaemonSet, no account, no trust.
	objs, err = deploy.Render(deploy.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if notes, err := deploy.Notes(deploy.RenderOptions{}); err != nil || strings.Contains(notes, "dataplane-mode") {
		t.Errorf("NOTES.txt speaks of ambient mode without the profile (%v):\n%s", err, notes)
	}
	if find(objs, "DaemonSet", "trustmesh-node") != nil || find(objs, "ServiceAccount", "trustmesh-node") != nil {
		t.Error("the node agent without the ambient profile")
	}
	if got := flagValues(controlPlaneArgs(t, objs), "--trusted-node-accounts"); len(got) != 0 {
		t.Errorf("--trusted-node-accounts %v without the ambient profile", got)
	}
}

func TestAmbientValuesSchema(t *testing.T) {
	for name, ambient := range map[string]map[string]any{
		"unknown field":                {"enabled": true, "hostNetwork": true},
		"a TTL that is not a duration": {"enabled": true, "certTTL": "1 day"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"ambient": ambient}})
			if !errors.Is(err, deploy.ErrInvalidValues) {
				t.Fatalf("error %v, want ErrInvalidValues", err)
			}
		})
	}
}

func nodeCapabilities(t *testing.T, c *corev1.Container) []string {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Fatalf("the node agent does not drop every capability: %+v", sc)
	}
	var caps []string
	for _, c := range sc.Capabilities.Add {
		caps = append(caps, string(c))
	}
	return caps
}

// TestNodeAgentCapabilities checks on this kernel that the capabilities the
// chart gives the node agent are the ones it needs, and that it needs
// them: a root process with the chart's bounding set reads another user's
// (and root's) /proc/PID/exe, ns/net and cgroup, and the binary through
// exe; with none of them it reads only the cgroup and the start time.
func TestNodeAgentCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: it runs processes as another user and as root with capabilities dropped")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv (util-linux) is needed: %v", err)
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	// CAP_SYS_PTRACE is bit 19 of the bounding set.
	for _, l := range strings.Split(string(status), "\n") {
		if b, ok := strings.CutPrefix(l, "CapBnd:"); ok {
			bnd, err := strconv.ParseUint(strings.TrimSpace(b), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			if bnd&(1<<19) == 0 {
				t.Skip("this test's own process lacks CAP_SYS_PTRACE (a container without it): it cannot show the agent's")
			}
		}
	}
	objs, err := deploy.Render(deploy.RenderOptions{Values: ambientValues()})
	if err != nil {
		t.Fatal(err)
	}
	ds := daemonSet(t, objs, "trustmesh-node")
	bounding := "-all"
	for _, c := range nodeCapabilities(t, &ds.Spec.Template.Spec.Containers[0]) {
		bounding += ",+" + strings.ToLower(c)
	}

	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	start := func(uid uint32) int {
		t.Helper()
		cmd := exec.Command(sleep, "60")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return cmd.Process.Pid
	}
	// read reports whether a root process with the bounding set reads file.
	read := func(bounding, script string, pid int) bool {
		t.Helper()
		cmd := exec.Command(setpriv, "--bounding-set="+bounding, "--inh-caps=-all", "--", "sh", "-ec", script, "probe", strconv.Itoa(pid))
		out, err := cmd.CombinedOutput()
		t.Logf("%s %s (pid %d): %v %q", bounding, script, pid, err, out)
		return err == nil
	}
	const (
		exe    = `test -n "$(readlink /proc/$1/exe)"`
		netns  = `test -n "$(readlink /proc/$1/ns/net)"`
		hash   = `cat /proc/$1/exe >/dev/null`
		cgroup = `test -n "$(cat /proc/$1/cgroup)"`
		stat   = `test -n "$(cat /proc/$1/stat)"`
	)
	for name, pid := range map[string]int{"another user's": start(65534), "root's": start(0)} {
		t.Run(name, func(t *testing.T) {
			for _, s := range []string{exe, netns, hash, cgroup, stat} {
				if !read(bounding, s, pid) {
					t.Errorf("with the chart's capabilities (%s): %s fails", bounding, s)
				}
			}
			for _, s := range []string{exe, netns, hash} {
				if read("-all", s, pid) {
					t.Errorf("without capabilities %s succeeds: the chart's would not be needed", s)
				}
			}
			for _, s := range []string{cgroup, stat} {
				if !read("-all", s, pid) {
					t.Errorf("without capabilities %s fails", s)
				}
			}
		})
	}
}
