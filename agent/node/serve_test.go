package node

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/agent/attest"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

var (
	serveTD = spiffeid.RequireTrustDomainFromString("cluster.local")
	idWeb   = spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/web")
	idAPI   = spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/api")
)

// fakeIdentities is the node's holder, as the server sees it.
type fakeIdentities struct {
	mu        sync.Mutex
	entries   []Entry
	stores    map[spiffeid.ID]*identity.Store
	changed   chan struct{}
	refreshes int
}

func newFakeIdentities() *fakeIdentities {
	return &fakeIdentities{stores: map[spiffeid.ID]*identity.Store{}, changed: make(chan struct{})}
}

func (f *fakeIdentities) Entries() ([]Entry, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.entries, f.changed
}

func (f *fakeIdentities) Store(id spiffeid.ID) *identity.Store {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stores[id]
}

func (f *fakeIdentities) Refresh(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refreshes++
	return nil
}

func (f *fakeIdentities) Refreshes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refreshes
}

// set replaces the entries and the held stores, as a fetch does.
func (f *fakeIdentities) set(entries []Entry, stores map[spiffeid.ID]*identity.Store) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = entries
	if stores != nil {
		f.stores = stores
	}
	close(f.changed)
	f.changed = make(chan struct{})
}

// logBuffer collects the server's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type nodeFixture struct {
	auth *testca.Authority
	ids  *fakeIdentities
	dir  string // world-readable, for helpers running as other users
	sock string
	logs *logBuffer
}

// startServer serves ids on a socket in a fresh directory that every user
// can reach.
func startServer(t *testing.T, ids *fakeIdentities, pending time.Duration) *nodeFixture {
	t.Helper()
	return startServerWith(t, ids, pending, attest.Options{})
}

func startServerWith(t *testing.T, ids *fakeIdentities, pending time.Duration, opts attest.Options) *nodeFixture {
	t.Helper()
	dir, err := os.MkdirTemp("", "tm-node-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := &nodeFixture{auth: testca.New(t, serveTD, time.Now()), ids: ids, dir: dir,
		sock: filepath.Join(dir, "node", "socket"), logs: &logBuffer{}}
	srv, err := NewServer(ServerConfig{
		Identities: ids, SocketPath: f.sock, PendingWait: pending, AliveInterval: 100 * time.Millisecond, Attest: opts,
		Logger: slog.New(slog.NewTextHandler(f.logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", f.sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket not served")
		}
		time.Sleep(10 * time.Millisecond)
	}
	info, err := os.Stat(f.sock)
	if err != nil || info.Mode().Perm() != 0o666 {
		t.Fatalf("socket %v, %v: want mode 0666, attestation decides", info, err)
	}
	return f
}

// store returns a store holding a fresh SVID of id and the bundle.
func (f *nodeFixture) store(t *testing.T, id spiffeid.ID) *identity.Store {
	t.Helper()
	st := identity.New()
	st.SetBundle(f.auth.Bundle())
	st.SetSVID(f.auth.SVID(t, id, time.Now().Add(-time.Minute), time.Hour))
	return st
}

func uidSelector(uid int) []string { return []string{cav1.SelectorUID + strconv.Itoa(uid)} }

// fetch fetches from the socket in this process, with go-spiffe's client.
func (f *nodeFixture) fetch(t *testing.T) ([]*x509svid.SVID, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+f.sock))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.FetchX509SVIDs(ctx)
}

func svidIDs(svids []*x509svid.SVID) []string {
	var out []string
	for _, s := range svids {
		out = append(out, s.ID.String())
	}
	return out
}

// The tests below attest this test process itself; they need no root.

func TestCallerMatchingNothingIsRefusedAfterRefreshing(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 300*time.Millisecond)
	ids.set([]Entry{{ID: idWeb, Selectors: uidSelector(os.Getuid() + 1)}}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb)})
	start := time.Now()
	_, err := f.fetch(t)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("caller matching no entry: %v, want PermissionDenied", err)
	}
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Fatalf("refused after %s, before PendingWait", waited)
	}
	if ids.Refreshes() == 0 {
		t.Fatal("the entries were not refreshed for a caller matching nothing")
	}
}

func TestCallerWaitedForGetsAnEntryThatArrives(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 10*time.Second)
	go func() {
		time.Sleep(200 * time.Millisecond)
		ids.set([]Entry{{ID: idWeb, Selectors: uidSelector(os.Getuid())}}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb)})
	}()
	svids, err := f.fetch(t)
	if err != nil || len(svids) != 1 || svids[0].ID != idWeb {
		t.Fatalf("waiting caller got %v, %v; want %s", svidIDs(svids), err, idWeb)
	}
}

func TestCallerGetsEveryMatchedIdentitySortedAndNothingElse(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 300*time.Millisecond)
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/other")
	me := uidSelector(os.Getuid())
	ids.set([]Entry{
		{ID: idWeb, Selectors: me},
		{ID: idAPI, Selectors: append(me, cav1.SelectorGID+strconv.Itoa(os.Getgid()))},
		{ID: idWeb, Selectors: me}, // a second pod of the same account
		{ID: other, Selectors: append(me, cav1.SelectorPath+"/no/such/binary")},
	}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb), idAPI: f.store(t, idAPI), other: f.store(t, other)})
	svids, err := f.fetch(t)
	if err != nil {
		t.Fatal(err)
	}
	if got := svidIDs(svids); len(got) != 2 || got[0] != idAPI.String() || got[1] != idWeb.String() {
		t.Fatalf("caller got %v, want [%s %s]", got, idAPI, idWeb)
	}
}

func TestMatchedButNotIssuedIsUnavailable(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 300*time.Millisecond)
	ids.set([]Entry{{ID: idWeb, Selectors: uidSelector(os.Getuid())}}, nil)
	conn, err := grpc.NewClient("unix://"+f.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 10*time.Second)
	defer cancel()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("matched caller without an issued SVID: %v, want Unavailable", err)
	}
}

func TestSecurityHeaderStillRequired(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 300*time.Millisecond)
	ids.set([]Entry{{ID: idWeb, Selectors: uidSelector(os.Getuid())}}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb)})
	conn, err := grpc.NewClient("unix://"+f.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("call without the security header: %v, want InvalidArgument", err)
	}
}

func TestStreamEndsWhenTheCallerLosesItsEntry(t *testing.T) {
	ids := newFakeIdentities()
	f := startServer(t, ids, 300*time.Millisecond)
	ids.set([]Entry{{ID: idWeb, Selectors: uidSelector(os.Getuid())}}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb)})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+f.sock))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := &recorder{updates: make(chan []string, 10), errs: make(chan error, 10)}
	done := make(chan error, 1)
	go func() { done <- c.WatchX509Context(ctx, w) }()
	if got := <-w.updates; len(got) != 1 || got[0] != idWeb.String() {
		t.Fatalf("first update %v", got)
	}
	ids.set(nil, nil)
	select {
	case err := <-w.errs:
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("stream of a caller without entries ended with %v, want PermissionDenied", err)
		}
	case u := <-w.updates:
		t.Fatalf("caller without entries got %v", u)
	case <-time.After(10 * time.Second):
		t.Fatal("stream went on after the caller lost its entry")
	}
	cancel()
	<-done
}

type recorder struct {
	updates chan []string
	errs    chan error
}

func (r *recorder) OnX509ContextUpdate(c *workloadapi.X509Context) { r.updates <- svidIDs(c.SVIDs) }
func (r *recorder) OnX509ContextWatchError(err error)              { r.errs <- err }

// The tests below run real processes under other users: root only.

const helperEnv = "TM_NODESERVE_HELPER"

// helperOut is what a helper process prints, one JSON object a line.
type helperOut struct {
	IDs     []string `json:"ids,omitempty"`
	Serials []string `json:"serials,omitempty"`
	Code    string   `json:"code,omitempty"`
	Err     string   `json:"err,omitempty"`
	PID     int      `json:"pid,omitempty"`
	RootCA  bool     `json:"rootCA,omitempty"`
}

// TestHelperProcess is not a test: it is the body of the helper processes
// the tests start (as other users) from a copy of the test binary.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return // only the helper processes of the tests below run it
	}
	sock := os.Getenv("TM_NODESERVE_SOCKET")
	out := json.NewEncoder(os.Stdout)
	fail := func(err error) {
		_ = out.Encode(helperOut{Code: status.Code(err).String(), Err: err.Error()})
		os.Exit(0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	switch mode {
	case "fetch":
		svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr("unix://"+sock))
		if err != nil {
			fail(err)
		}
		_ = out.Encode(helperOut{IDs: svidIDs(svids), Serials: serials(svids)})
	case "watch":
		// Print every update until stdin closes.
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
		c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
		if err != nil {
			fail(err)
		}
		_ = c.WatchX509Context(ctx, printer{out})
	case "hold":
		// Watch, then hand the connection to a child that outlives this
		// process: the server must end the stream once its caller is gone.
		var uc *net.UnixConn
		conn, err := grpc.NewClient("passthrough:///node", grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				c, err := (&net.Dialer{}).DialContext(ctx, "unix", sock)
				if err == nil {
					uc = c.(*net.UnixConn)
				}
				return c, err
			}))
		if err != nil {
			fail(err)
		}
		stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(
			metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), &workload.X509SVIDRequest{})
		if err != nil {
			fail(err)
		}
		if _, err := stream.Recv(); err != nil {
			fail(err)
		}
		file, err := uc.File()
		if err != nil {
			fail(err)
		}
		child := exec.Command("sleep", "60")
		child.ExtraFiles = []*os.File{file}
		if err := child.Start(); err != nil {
			fail(err)
		}
		_ = out.Encode(helperOut{PID: child.Process.Pid})
	case "sds":
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fail(err)
		}
		stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
		if err != nil {
			fail(err)
		}
		node := &core.Node{Id: "sidecar~10.0.0.1~web.demo~demo.svc.cluster.local", Cluster: "web.demo"}
		names := []string{"default", "ROOTCA"}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names}); err != nil {
			fail(err)
		}
		var res helperOut
		for !res.RootCA || len(res.IDs) == 0 {
			resp, err := stream.Recv()
			if err != nil {
				fail(err)
			}
			for _, r := range resp.GetResources() {
				var s tlsv3.Secret
				if err := r.UnmarshalTo(&s); err != nil {
					fail(err)
				}
				switch s.GetName() {
				case "ROOTCA":
					res.RootCA = len(s.GetValidationContext().GetTrustedCa().GetInlineBytes()) > 0
				case "default":
					tc := s.GetTlsCertificate()
					svid, err := x509svid.Parse(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
					if err != nil {
						fail(err)
					}
					res.IDs = []string{svid.ID.String()}
				}
			}
			_ = stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names,
				VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
		}
		_ = out.Encode(res)
	}
	os.Exit(0)
}

type printer struct{ out *json.Encoder }

func (p printer) OnX509ContextUpdate(c *workloadapi.X509Context) {
	_ = p.out.Encode(helperOut{IDs: svidIDs(c.SVIDs), Serials: serials(c.SVIDs)})
}
func (p printer) OnX509ContextWatchError(err error) {
	_ = p.out.Encode(helperOut{Code: status.Code(err).String(), Err: err.Error()})
}

func serials(svids []*x509svid.SVID) []string {
	var out []string
	for _, s := range svids {
		out = append(out, s.Certificates[0].SerialNumber.String())
	}
	return out
}

// helper runs a helper process as uid (and gid uid) from a copy of the test
// binary that every user may run.
type helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan helperOut
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("runs helper processes as other users: needs root")
	}
}

func (f *nodeFixture) binary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(f.dir, "helper.test")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

func (f *nodeFixture) start(t *testing.T, mode string, uid int) *helper {
	t.Helper()
	cmd := exec.Command(f.binary(t), "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "TM_NODESERVE_SOCKET="+f.sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, lines: make(chan helperOut, 100)}
	if h.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(h.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var o helperOut
			if err := json.Unmarshal(sc.Bytes(), &o); err != nil {
				o = helperOut{Err: "helper printed " + sc.Text()}
			}
			h.lines <- o
		}
	}()
	t.Cleanup(func() {
		h.stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return h
}

func (h *helper) next(t *testing.T, within time.Duration) (helperOut, bool) {
	t.Helper()
	select {
	case o, ok := <-h.lines:
		if !ok {
			t.Fatal("helper ended without a word")
		}
		return o, true
	case <-time.After(within):
		return helperOut{}, false
	}
}

func (h *helper) must(t *testing.T) helperOut {
	t.Helper()
	o, ok := h.next(t, 30*time.Second)
	if !ok {
		t.Fatal("helper said nothing in 30s")
	}
	return o
}

const uidWeb, uidAPI, uidNobody = 41001, 41002, 41003

func twoWorkloads(t *testing.T, pending time.Duration) *nodeFixture {
	t.Helper()
	return twoWorkloadsWith(t, pending, attest.Options{})
}

func twoWorkloadsWith(t *testing.T, pending time.Duration, opts attest.Options) *nodeFixture {
	t.Helper()
	needRoot(t)
	ids := newFakeIdentities()
	f := startServerWith(t, ids, pending, opts)
	ids.set([]Entry{
		{ID: idWeb, Selectors: uidSelector(uidWeb)},
		{ID: idAPI, Selectors: uidSelector(uidAPI)},
	}, map[spiffeid.ID]*identity.Store{idWeb: f.store(t, idWeb), idAPI: f.store(t, idAPI)})
	return f
}

// pinnings runs a test with each way the attest package pins a peer: the
// pidfd where the kernel has SO_PEERPIDFD, and SO_PEERCRED with the start
// time everywhere.
var pinnings = []struct {
	name string
	opts attest.Options
}{{"pidfd", attest.Options{}}, {"peercred", attest.Options{NoPidfd: true}}}

func TestProcessesGetExactlyTheirOwnIdentity(t *testing.T) {
	for _, p := range pinnings {
		t.Run(p.name, func(t *testing.T) {
			f := twoWorkloadsWith(t, 500*time.Millisecond, p.opts)
			web, api, nobody := f.start(t, "fetch", uidWeb), f.start(t, "fetch", uidAPI), f.start(t, "fetch", uidNobody)
			if o := web.must(t); len(o.IDs) != 1 || o.IDs[0] != idWeb.String() {
				t.Fatalf("process of uid %d got %+v, want only %s", uidWeb, o, idWeb)
			}
			if o := api.must(t); len(o.IDs) != 1 || o.IDs[0] != idAPI.String() {
				t.Fatalf("process of uid %d got %+v, want only %s", uidAPI, o, idAPI)
			}
			if o := nobody.must(t); o.Code != codes.PermissionDenied.String() || len(o.IDs) != 0 {
				t.Fatalf("process matching no entry got %+v, want PermissionDenied", o)
			}
		})
	}
}

func TestRotationIsStreamedToItsOwnerOnly(t *testing.T) {
	f := twoWorkloads(t, 500*time.Millisecond)
	web, api := f.start(t, "watch", uidWeb), f.start(t, "watch", uidAPI)
	first := web.must(t)
	if len(first.IDs) != 1 || first.IDs[0] != idWeb.String() {
		t.Fatalf("web watcher started with %+v", first)
	}
	if o := api.must(t); len(o.IDs) != 1 || o.IDs[0] != idAPI.String() {
		t.Fatalf("api watcher started with %+v", o)
	}
	rotated := f.auth.SVID(t, idWeb, time.Now().Add(-time.Minute), time.Hour)
	f.ids.Store(idWeb).SetSVID(rotated)
	o := web.must(t)
	if len(o.Serials) != 1 || o.Serials[0] != rotated.Certificates[0].SerialNumber.String() {
		t.Fatalf("web watcher got %+v after rotation, want serial %s", o, rotated.Certificates[0].SerialNumber)
	}
	if o, ok := api.next(t, time.Second); ok {
		t.Fatalf("web's rotation reached the api watcher: %+v", o)
	}
}

func TestStreamEndsWhenTheAttestedProcessIsGone(t *testing.T) {
	for _, p := range pinnings {
		t.Run(p.name, func(t *testing.T) {
			f := twoWorkloadsWith(t, 500*time.Millisecond, p.opts)
			h := f.start(t, "hold", uidWeb)
			o := h.must(t)
			if o.PID == 0 {
				t.Fatalf("holder: %+v", o)
			}
			// The holder exits; its child keeps the connection open.
			t.Cleanup(func() { _ = syscall.Kill(o.PID, syscall.SIGKILL) })
			if err := h.cmd.Wait(); err != nil {
				t.Fatalf("holder: %v", err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(f.logs.String(), "ending the stream of a caller that is gone") {
				if time.Now().After(deadline) {
					t.Fatalf("stream of a gone caller still open; log:\n%s", f.logs)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err := syscall.Kill(o.PID, 0); err != nil {
				t.Fatalf("the child holding the connection is not running (%v): the test shows nothing", err)
			}
		})
	}
}

func TestSDSServesEachProxyItsOwnIdentity(t *testing.T) {
	f := twoWorkloads(t, 500*time.Millisecond)
	web, api := f.start(t, "sds", uidWeb), f.start(t, "sds", uidAPI)
	if o := web.must(t); len(o.IDs) != 1 || o.IDs[0] != idWeb.String() || !o.RootCA {
		t.Fatalf("web's proxy got %+v, want default %s and ROOTCA", o, idWeb)
	}
	if o := api.must(t); len(o.IDs) != 1 || o.IDs[0] != idAPI.String() || !o.RootCA {
		t.Fatalf("api's proxy got %+v, want default %s and ROOTCA", o, idAPI)
	}
	nobody := f.start(t, "sds", uidNobody)
	if o := nobody.must(t); o.Code != codes.PermissionDenied.String() {
		t.Fatalf("proxy matching no entry got %+v, want PermissionDenied", o)
	}
}
