//go:build linux

package attest_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/agent/attest"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// The test binary re-executes itself as the processes that call the
// server; TM_ATTEST_HELPER says as which.
const (
	envHelper  = "TM_ATTEST_HELPER"
	envSocket  = "TM_ATTEST_SOCKET"
	envCgroups = "TM_ATTEST_CGROUPS" // cgroup directories to join, ','-separated
	envUID     = "TM_ATTEST_UID"
	envGID     = "TM_ATTEST_GID"
	envKeep    = "TM_ATTEST_KEEP" // handoff: stay alive until the child is done
)

func TestMain(m *testing.M) {
	var err error
	switch h := os.Getenv(envHelper); h {
	case "":
		os.Exit(m.Run())
	case "call":
		err = helperCall()
	case "handoff":
		err = helperHandoff()
	case "inherited":
		err = helperInherited()
	default:
		err = fmt.Errorf("unknown helper %q", h)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	os.Exit(0)
}

// reply is what the test server tells a caller about itself.
type reply struct {
	PID         int32
	UID, GID    uint32
	Path        string
	PodUID      string
	ContainerID string
	Matches     map[string]bool
}

// outcome is a helper's one line of output: the reply, or the call's code.
type outcome struct {
	Code  codes.Code
	Reply reply
}

const whoMethod = "/trustmesh.attest.test.Who/Attest"

func call(ctx context.Context, cc *grpc.ClientConn) outcome {
	var out wrapperspb.StringValue
	if err := cc.Invoke(ctx, whoMethod, &emptypb.Empty{}, &out); err != nil {
		return outcome{Code: status.Code(err)}
	}
	var o outcome
	if err := json.Unmarshal([]byte(out.GetValue()), &o.Reply); err != nil {
		o.Code = codes.DataLoss
	}
	return o
}

func printOutcome(o outcome) error {
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(b))
	return err
}

// helperCall joins cgroups, drops to a uid and gid, and calls the server.
func helperCall() error {
	for _, dir := range strings.Split(os.Getenv(envCgroups), ",") {
		if dir == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return err
		}
	}
	if u := os.Getenv(envUID); u != "" {
		uid, _ := strconv.Atoi(u)
		gid, _ := strconv.Atoi(os.Getenv(envGID))
		if err := syscall.Setgroups(nil); err != nil {
			return err
		}
		if err := syscall.Setgid(gid); err != nil {
			return err
		}
		if err := syscall.Setuid(uid); err != nil {
			return err
		}
	}
	cc, err := grpc.NewClient("unix://"+os.Getenv(envSocket), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return printOutcome(call(ctx, cc))
}

// readLine reads one line from stdin a byte at a time, so that nothing
// meant for a process that inherits stdin is consumed.
func readLine() (string, error) {
	var b [1]byte
	var line []byte
	for {
		if _, err := os.Stdin.Read(b[:]); err != nil {
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
}

// helperHandoff connects, waits to be told, then hands the connection to a
// child process and, unless told to keep living, exits.
func helperHandoff() error {
	c, err := net.Dial("unix", os.Getenv(envSocket))
	if err != nil {
		return err
	}
	f, err := c.(*net.UnixConn).File()
	if err != nil {
		return err
	}
	fmt.Println("connected")
	if _, err := readLine(); err != nil {
		return err
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envHelper+"=inherited")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	fmt.Println("started", cmd.Process.Pid)
	if os.Getenv(envKeep) != "" {
		return cmd.Wait()
	}
	return nil
}

// helperInherited calls the server over the connection it inherited, once
// told to.
func helperInherited() error {
	c, err := net.FileConn(os.NewFile(3, "inherited"))
	if err != nil {
		return err
	}
	if _, err := readLine(); err != nil {
		return err
	}
	used := false
	cc, err := grpc.NewClient("passthrough:///inherited",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			if used {
				return nil, errors.New("the inherited connection is used")
			}
			used = true
			return c, nil
		}))
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return printOutcome(call(ctx, cc))
}

// server is a gRPC server with attest.Credentials that tells each caller
// what it attested and which selector lists it matches.
type server struct {
	socket string
	peers  chan *attest.Peer
	errs   chan error // handshake failures
}

type notifying struct {
	credentials.TransportCredentials
	peers chan<- *attest.Peer
	errs  chan<- error
}

func (n notifying) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := n.TransportCredentials.ServerHandshake(c)
	if err == nil {
		select {
		case n.peers <- info.(*attest.Peer):
		default:
		}
	} else {
		select {
		case n.errs <- err:
		default:
		}
	}
	return conn, info, err
}

func startServer(t *testing.T, dir string, opts attest.Options, selectors map[string][]string) *server {
	t.Helper()
	return startServerGated(t, dir, opts, selectors, nil)
}

// gatedListener accepts nothing until its gate is closed.
type gatedListener struct {
	net.Listener
	gate <-chan struct{}
}

func (l gatedListener) Accept() (net.Conn, error) {
	<-l.gate
	return l.Listener.Accept()
}

// startServerGated starts a server that accepts no connection before gate
// is closed, if gate is not nil.
func startServerGated(t *testing.T, dir string, opts attest.Options, selectors map[string][]string, gate <-chan struct{}) *server {
	t.Helper()
	s := &server{socket: filepath.Join(dir, "socket"), peers: make(chan *attest.Peer, 16), errs: make(chan error, 16)}
	lis, err := net.Listen("unix", s.socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(s.socket, 0o777); err != nil {
		t.Fatal(err)
	}
	if gate != nil {
		lis = gatedListener{lis, gate}
	}
	who := func(_ any, stream grpc.ServerStream) error {
		if err := stream.RecvMsg(&emptypb.Empty{}); err != nil {
			return err
		}
		p, ok := attest.PeerFromContext(stream.Context())
		if !ok {
			return status.Error(codes.Unauthenticated, "no attested peer")
		}
		c, err := p.Attest(stream.Context())
		if errors.Is(err, attest.ErrGone) {
			t.Logf("server: attesting PID %d: %v", p.PID(), err)
			return status.Error(codes.PermissionDenied, err.Error())
		}
		if err != nil {
			// Not the refusal a gone caller must get.
			t.Logf("server: attesting PID %d: %v", p.PID(), err)
			return status.Error(codes.Internal, err.Error())
		}
		r := reply{PID: c.PID, UID: c.UID, GID: c.GID, Path: c.Path, PodUID: c.PodUID,
			ContainerID: c.ContainerID, Matches: map[string]bool{}}
		for name, sel := range selectors {
			r.Matches[name] = c.Matches(sel)
		}
		b, err := json.Marshal(r)
		if err != nil {
			return err
		}
		return stream.SendMsg(wrapperspb.String(string(b)))
	}
	srv := grpc.NewServer(
		grpc.Creds(notifying{attest.Credentials(opts), s.peers, s.errs}),
		grpc.UnknownServiceHandler(who))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test runs processes under other uids, in their own network namespaces and cgroups")
	}
}

// publicDir is a temporary directory that other uids can reach.
func publicDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "trustmesh-attest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// helperBinary copies the test binary where other uids can run it.
func helperBinary(t *testing.T, dir string) (path, sum string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(dir, "helper")
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return path, hex.EncodeToString(h[:])
}

// addNetns makes a network namespace bound at dir/name, as `ip netns add`
// does under /run/netns.
func addNetns(t *testing.T, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("unshare", "--net="+path, "true").CombinedOutput(); err != nil {
		t.Fatalf("unshare --net=%s: %v: %s", path, err, out)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", path, err)
		}
	})
	return path
}

// cgroupHierarchies finds a writable cgroup v1 hierarchy and the cgroup v2
// one; "" where there is none.
func cgroupHierarchies() (v1, v2 string) {
	isFS := func(path string, magic int64) bool {
		var st unix.Statfs_t
		return unix.Statfs(path, &st) == nil && int64(st.Type) == magic && unix.Access(path, unix.W_OK) == nil
	}
	for _, c := range []string{"pids", "cpu", "memory", "devices"} {
		if p := "/sys/fs/cgroup/" + c; isFS(p, unix.CGROUP_SUPER_MAGIC) {
			v1 = p
			break
		}
	}
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if isFS(p, unix.CGROUP2_SUPER_MAGIC) {
			v2 = p
			break
		}
	}
	return v1, v2
}

// makeCgroup makes root/top/rel and removes it when the test ends.
func makeCgroup(t *testing.T, root, top, rel string) string {
	t.Helper()
	base := filepath.Join(root, top)
	dir := filepath.Join(base, rel)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for d := dir; strings.HasPrefix(d, base); d = filepath.Dir(d) {
			if err := os.Remove(d); err != nil {
				t.Errorf("removing cgroup %s: %v", d, err)
			}
		}
	})
	return dir
}

// runCall runs the helper binary as one caller and returns what it got.
func runCall(t *testing.T, argv []string, env ...string) outcome {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), append([]string{envHelper + "=call"}, env...)...)
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("%v: %v: %s", argv, err, ee.Stderr)
		}
		t.Fatalf("%v: %v", argv, err)
	}
	var o outcome
	if err := json.Unmarshal(out, &o); err != nil {
		t.Fatalf("helper output %q: %v", out, err)
	}
	return o
}

// TestWorkloadsAttested runs two callers, each under its own uid and gid, in
// its own network namespace and pod cgroup (cgroup v1 with the cgroupfs
// driver's layout, cgroup v2 with the systemd driver's, as this machine
// has them), and checks that the server sees exactly each one's attributes
// and that each matches its own selectors and not the other's.
func TestWorkloadsAttested(t *testing.T) {
	requireRoot(t)
	v1, v2 := cgroupHierarchies()
	if v1 == "" && v2 == "" {
		t.Skip("no writable cgroup hierarchy under /sys/fs/cgroup to put the callers in pod cgroups")
	}
	dir := publicDir(t)
	bin, sum := helperBinary(t, dir)
	netnsDir := filepath.Join(dir, "netns")
	if err := os.Mkdir(netnsDir, 0o755); err != nil {
		t.Fatal(err)
	}

	type workload struct {
		name     string
		uid, gid uint32
		pod, ctr string
		cgroupV1 bool   // else v2
		cgroup   string // relative to the hierarchy
		mountNS  bool   // runs in a mount namespace of its own
	}
	const (
		podA = "0d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6"
		ctrA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
		podB = "9f8e7d6c-5b4a-4392-8170-fedcba987654"
		ctrB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	)
	workloads := []workload{
		{name: "a", uid: 1001, gid: 1001, pod: podA, ctr: ctrA, cgroupV1: v1 != "",
			cgroup: "kubepods/burstable/pod" + podA + "/" + ctrA},
		{name: "b", uid: 1002, gid: 1003, pod: podB, ctr: ctrB, cgroupV1: v2 == "",
			cgroup: "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" +
				strings.ReplaceAll(podB, "-", "_") + ".slice/cri-containerd-" + ctrB + ".scope"},
		// A process that names pod a's cgroup inside a subtree it was
		// given (a systemd user manager's) is no pod (review15-sec F1).
		{name: "spoof", uid: 1004, gid: 1004, cgroupV1: v2 == "",
			cgroup: "user.slice/user@1004.service/kubepods/burstable/pod" + podA + "/" + ctrA},
		// The same program in a mount namespace of its own: its path and
		// executable are that namespace's, so neither matches (review15-sec F2).
		{name: "mntns", uid: 1005, gid: 1005, cgroupV1: v2 == "", cgroup: "other/mntns", mountNS: true},
	}
	// The pods' cgroups are under a kubelet cgroup root of the test's own.
	top := fmt.Sprintf("trustmesh-attest-%d-%d", os.Getpid(), time.Now().UnixNano())
	selectors := map[string][]string{
		"unknown type": {"unix:shell:/bin/sh"},
		"empty":        {},
		"sha256":       {cav1.SelectorSHA256 + sum},
		"wrong sha256": {cav1.SelectorSHA256 + strings.Repeat("0", 64)},
		"path":         {cav1.SelectorPath + bin},
		"wrong path":   {cav1.SelectorPath + bin + "x"},
	}
	for _, w := range workloads {
		addNetns(t, netnsDir, w.name)
		selectors["uid "+w.name] = []string{cav1.SelectorUID + strconv.Itoa(int(w.uid))}
		selectors["gid "+w.name] = []string{cav1.SelectorGID + strconv.Itoa(int(w.gid))}
		selectors["netns "+w.name] = []string{cav1.SelectorNetns + w.name}
		selectors["netns path "+w.name] = []string{cav1.SelectorNetns + filepath.Join(netnsDir, w.name)}
		if w.pod == "" {
			continue
		}
		selectors["pod "+w.name] = []string{cav1.SelectorPodUID + w.pod}
		selectors["all "+w.name] = []string{
			cav1.SelectorUID + strconv.Itoa(int(w.uid)), cav1.SelectorGID + strconv.Itoa(int(w.gid)),
			cav1.SelectorPath + bin, cav1.SelectorSHA256 + sum, cav1.SelectorNetns + w.name,
			cav1.SelectorPodUID + w.pod}
	}

	for _, mode := range []struct {
		name string
		opts attest.Options
	}{{"pidfd", attest.Options{NetnsDir: netnsDir}}, {"peercred", attest.Options{NetnsDir: netnsDir, NoPidfd: true}}} {
		mode.opts.KubeletCgroupRoot = "/" + top
		t.Run(mode.name, func(t *testing.T) {
			srvDir := filepath.Join(dir, mode.name)
			if err := os.Mkdir(srvDir, 0o755); err != nil {
				t.Fatal(err)
			}
			srv := startServer(t, srvDir, mode.opts, selectors)
			for _, w := range workloads {
				t.Run(w.name, func(t *testing.T) {
					ns := filepath.Join(netnsDir, w.name)
					root := v2
					if w.cgroupV1 {
						root = v1
					}
					cg := makeCgroup(t, root, top, w.cgroup)
					argv := []string{"nsenter", "--net=" + ns, "--", bin}
					if w.mountNS {
						argv = []string{"nsenter", "--net=" + ns, "--", "unshare", "--mount", "--", bin}
					}
					o := runCall(t, argv,
						envSocket+"="+srv.socket, envCgroups+"="+cg,
						envUID+"="+strconv.Itoa(int(w.uid)), envGID+"="+strconv.Itoa(int(w.gid)))
					if o.Code != codes.OK {
						t.Fatalf("call: %v", o.Code)
					}
					r := o.Reply
					if r.UID != w.uid || r.GID != w.gid || r.Path != bin || r.PodUID != w.pod || r.ContainerID != w.ctr {
						t.Errorf("attested uid %d gid %d path %q pod %q container %q; want %d %d %q %q %q",
							r.UID, r.GID, r.Path, r.PodUID, r.ContainerID, w.uid, w.gid, bin, w.pod, w.ctr)
					}
					for name, got := range r.Matches {
						want := (name == "sha256" || name == "path") && !w.mountNS || strings.HasSuffix(name, " "+w.name)
						if got != want {
							t.Errorf("Matches(%s %q) = %v, want %v", name, selectors[name], got, want)
						}
					}
				})
			}
		})
	}
}

// TestHandoffRefusedOnceCallerIsGone: a process connects, hands the
// connection to a child (fd inherited over fork and exec) and exits; the
// child's call on it is refused, whether the exited process is still a
// zombie or already reaped. While the process that connected lives, the
// child is served as that process (the limit the package doc states).
func TestHandoffRefusedOnceCallerIsGone(t *testing.T) {
	requireRoot(t)
	dir := publicDir(t)
	bin, _ := helperBinary(t, dir)
	for _, mode := range []struct {
		name string
		opts attest.Options
	}{{"pidfd", attest.Options{}}, {"peercred", attest.Options{NoPidfd: true}}} {
		for _, tc := range []struct {
			name     string
			keep     bool // the connecting process stays alive
			reap     bool // else it is left a zombie
			late     bool // the server accepts only once the connector is reaped
			wantCode codes.Code
		}{
			{name: "connector alive", keep: true, wantCode: codes.OK},
			{name: "connector zombie", wantCode: codes.PermissionDenied},
			{name: "connector reaped", reap: true, wantCode: codes.PermissionDenied},
			// The handshake itself fails: the call never reaches a handler.
			{name: "connector reaped before the handshake", reap: true, late: true, wantCode: codes.Unavailable},
		} {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) {
				srvDir, err := os.MkdirTemp(dir, "srv-")
				if err != nil {
					t.Fatal(err)
				}
				gate := make(chan struct{})
				if !tc.late {
					close(gate)
				} else {
					defer func() {
						select {
						case <-gate:
						default:
							close(gate)
						}
					}()
				}
				srv := startServerGated(t, srvDir, mode.opts, nil, gate)
				inR, inW, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				outR, outW, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				defer inW.Close()
				defer outR.Close()
				parent := exec.Command(bin)
				parent.Env = append(os.Environ(), envHelper+"=handoff", envSocket+"="+srv.socket)
				if tc.keep {
					parent.Env = append(parent.Env, envKeep+"=1")
				}
				parent.Stdin, parent.Stdout, parent.Stderr = inR, outW, os.Stderr
				if err := parent.Start(); err != nil {
					t.Fatal(err)
				}
				inR.Close()
				outW.Close()
				waited := false
				defer func() {
					if !waited {
						parent.Process.Kill()
						parent.Wait()
					}
				}()
				out := bufio.NewReader(outR)
				line := func() string {
					l, err := out.ReadString('\n')
					if err != nil {
						t.Fatalf("reading the helpers' output: %v", err)
					}
					return strings.TrimSpace(l)
				}
				if l := line(); l != "connected" {
					t.Fatalf("parent said %q", l)
				}
				var peer *attest.Peer
				if !tc.late {
					select {
					case p := <-srv.peers:
						peer = p
						if p.PID() != int32(parent.Process.Pid) {
							t.Fatalf("the server pinned PID %d, want the connecting process %d", p.PID(), parent.Process.Pid)
						}
						if p.Pidfd() == mode.opts.NoPidfd {
							t.Fatalf("peer pinned by pidfd: %v, want %v", p.Pidfd(), !mode.opts.NoPidfd)
						}
					case <-time.After(10 * time.Second):
						t.Fatal("no handshake")
					}
				}
				if _, err := io.WriteString(inW, "handoff\n"); err != nil {
					t.Fatal(err)
				}
				childPID, err := strconv.Atoi(strings.TrimPrefix(line(), "started "))
				if err != nil {
					t.Fatal(err)
				}
				if !tc.keep {
					if tc.reap {
						parent.Wait()
						waited = true
					} else {
						waitZombie(t, parent.Process.Pid)
					}
				}
				if tc.late {
					close(gate)
					select {
					case p := <-srv.peers:
						t.Fatalf("the server pinned PID %d of a reaped connector", p.PID())
					case err := <-srv.errs:
						if !errors.Is(err, attest.ErrGone) {
							t.Fatalf("handshake: %v, want ErrGone", err)
						}
						t.Logf("handshake refused: %v", err)
					case <-time.After(10 * time.Second):
						t.Fatal("no handshake")
					}
				} else if peer.Alive() != tc.keep {
					t.Fatalf("Alive() = %v, want %v", !tc.keep, tc.keep)
				}
				if _, err := io.WriteString(inW, "go\n"); err != nil {
					t.Fatal(err)
				}
				var o outcome
				if err := json.Unmarshal([]byte(line()), &o); err != nil {
					t.Fatal(err)
				}
				if o.Code != tc.wantCode {
					t.Fatalf("the child's call on the handed-over connection: %v, want %v", o.Code, tc.wantCode)
				}
				if o.Code == codes.OK && o.Reply.PID != int32(parent.Process.Pid) {
					t.Fatalf("served as PID %d, want the connecting process %d (child %d)", o.Reply.PID, parent.Process.Pid, childPID)
				}
				if tc.keep {
					parent.Wait()
					waited = true
				}
			})
		}
	}
}

// waitZombie waits until pid has exited and is not yet reaped.
func waitZombie(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && strings.HasPrefix(string(b[i+1:]), " Z") {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d did not exit", pid)
}

// TestPeercredRefusesProcessStartedAfterHandshake: in the SO_PEERCRED
// fallback, a /proc/PID whose process started after the handshake began is
// a reused PID, and the handshake fails. A fake /proc (Options.ProcRoot)
// stands in for the new process; the caller is this test process.
func TestPeercredRefusesProcessStartedAfterHandshake(t *testing.T) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		t.Fatal(err)
	}
	now := uint64(ts.Nano() / int64(10*time.Millisecond)) // in ticks of 10 ms
	for _, tc := range []struct {
		name    string
		start   uint64
		refused bool
	}{
		{name: "started before", start: now - 100},
		{name: "started a second after", start: now + 100, refused: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proc := t.TempDir()
			pidDir := filepath.Join(proc, strconv.Itoa(os.Getpid()))
			if err := os.Mkdir(pidDir, 0o755); err != nil {
				t.Fatal(err)
			}
			stat := fmt.Sprintf("%d (attest.test) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", os.Getpid(), tc.start)
			if err := os.WriteFile(filepath.Join(pidDir, "stat"), []byte(stat), 0o644); err != nil {
				t.Fatal(err)
			}
			srv := startServer(t, t.TempDir(), attest.Options{ProcRoot: proc, NoPidfd: true}, nil)
			c, err := net.Dial("unix", srv.socket)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			select {
			case p := <-srv.peers:
				if tc.refused {
					t.Fatalf("handshake pinned PID %d, want it refused", p.PID())
				}
			case err := <-srv.errs:
				if !tc.refused || !errors.Is(err, attest.ErrGone) {
					t.Fatalf("handshake: %v, refused: want %v (ErrGone)", err, tc.refused)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no handshake")
			}
		})
	}
}

// TestSelfAttestedAndReleased: the test process calls the server itself (no
// root needed): it is attested as itself, in both modes, and every
// connection's process handles are released when the connection closes.
func TestSelfAttestedAndReleased(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	selectors := map[string][]string{
		"self": {cav1.SelectorUID + strconv.Itoa(os.Getuid()), cav1.SelectorGID + strconv.Itoa(os.Getgid()),
			cav1.SelectorPath + self, cav1.SelectorSHA256 + hex.EncodeToString(h[:]),
			cav1.SelectorNetns + "/proc/1/ns/net"},
		"other uid": {cav1.SelectorUID + strconv.Itoa(os.Getuid()+1)},
	}
	for _, mode := range []struct {
		name string
		opts attest.Options
	}{{"pidfd", attest.Options{}}, {"peercred", attest.Options{NoPidfd: true}}} {
		t.Run(mode.name, func(t *testing.T) {
			srv := startServer(t, t.TempDir(), mode.opts, selectors)
			before := openFDs(t)
			for range 20 {
				cc, err := grpc.NewClient("unix://"+srv.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				o := call(t.Context(), cc)
				cc.Close()
				if o.Code != codes.OK {
					t.Fatalf("call: %v", o.Code)
				}
				r := o.Reply
				if r.PID != int32(os.Getpid()) || r.UID != uint32(os.Getuid()) || r.GID != uint32(os.Getgid()) || r.Path != self {
					t.Fatalf("attested PID %d uid %d gid %d path %q, want this process", r.PID, r.UID, r.GID, r.Path)
				}
				if sameNetns(t) != r.Matches["self"] || r.Matches["other uid"] {
					t.Fatalf("Matches = %v", r.Matches)
				}
			}
			deadline := time.Now().Add(10 * time.Second)
			for openFDs(t) > before {
				if time.Now().After(deadline) {
					t.Fatalf("%d file descriptors open after the connections closed, %d before", openFDs(t), before)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// sameNetns reports whether this process is in PID 1's network namespace,
// which the "self" selectors name.
func sameNetns(t *testing.T) bool {
	t.Helper()
	a, err1 := os.Stat("/proc/self/ns/net")
	b, err2 := os.Stat("/proc/1/ns/net")
	if err1 != nil || err2 != nil {
		return false
	}
	return os.SameFile(a, b)
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
