package witness

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"

	"github.com/trustmesh/trustmesh/ca/journal"
)

const origin = "trustmesh.journal/example.org"

// logKey signs checkpoints of origin, as the CA's checkpoint key does.
type logKey struct {
	signer note.Signer
	vkey   string
}

func newLogKey(t *testing.T) logKey { return newLogKeyNamed(t, origin) }

// tree is a log of leaves named prefix-i: two trees with different prefixes
// from some index on are a fork.
type tree struct {
	leaves [][]byte
}

func newTree(n int, fork map[int]string) *tree {
	t := &tree{}
	for i := range n {
		body := fmt.Sprintf("entry-%d", i)
		if f, ok := fork[i]; ok {
			body = f
		}
		t.leaves = append(t.leaves, rfc6962.DefaultHasher.HashLeaf([]byte(body)))
	}
	return t
}

func (tr *tree) root(t *testing.T, size uint64) []byte {
	t.Helper()
	f := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	r := f.NewEmptyRange(0)
	for _, l := range tr.leaves[:size] {
		if err := r.Append(l, nil); err != nil {
			t.Fatal(err)
		}
	}
	h, err := r.GetRootHash(nil)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func (tr *tree) checkpoint(t *testing.T, k logKey, size uint64) []byte {
	t.Helper()
	signed, err := note.Sign(&note.Note{Text: journal.Checkpoint{Origin: origin, Size: size, Root: tr.root(t, size)}.Text()}, k.signer)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

// memSource serves one tree at a size, with real proofs from its leaves.
type memSource struct {
	t    *testing.T
	name string
	tr   *tree
	k    logKey
	size uint64
}

func (s *memSource) Name() string { return s.name }
func (s *memSource) Checkpoint(context.Context) ([]byte, error) {
	return s.tr.checkpoint(s.t, s.k, s.size), nil
}
func (s *memSource) Consistency(_ context.Context, size1, size2 uint64) ([][]byte, error) {
	return journal.ConsistencyProof(s.tr.leaves[:size2], size1)
}

var epoch = time.Date(2026, 12, 6, 4, 0, 0, 0, time.UTC)

func openWitness(t *testing.T, dir string, k logKey) *Witness {
	t.Helper()
	w, err := Open(dir, "witness.test/one", func() time.Time { return epoch })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	if _, err := w.AddLog("", k.vkey); err != nil {
		t.Fatal(err)
	}
	return w
}

func TestAcceptsAGrowingLogAndKeepsItsHistory(t *testing.T) {
	dir := t.TempDir()
	k := newLogKey(t)
	honest := newTree(40, nil)
	w := openWitness(t, dir, k)
	src := &memSource{t: t, name: "ca", tr: honest, k: k}
	m := &Monitor{W: w, Origin: origin, Sources: []Source{src}}
	for _, size := range []uint64{3, 7, 7, 20, 40} {
		src.size = size
		rep := m.Once(context.Background())
		if len(rep.Findings) != 0 || rep.Unreachable() || rep.Accepted != size {
			t.Fatalf("size %d: %+v", size, rep)
		}
	}
	sizes, err := w.History(origin)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(sizes) != "[3 7 20 40]" {
		t.Fatalf("history %v, want [3 7 20 40]", sizes)
	}
	// The cosignature is C2SP cosignature/v1 over the checkpoint.
	cosig, err := w.Add(honest.checkpoint(t, k, 40), 40, nil)
	if err != nil {
		t.Fatal(err)
	}
	cp := journal.Checkpoint{Origin: origin, Size: 40, Root: honest.root(t, 40)}
	if at, err := journal.VerifyCosignature(w.VerifierKey(), cp, cosig); err != nil || !at.Equal(epoch) {
		t.Fatalf("cosignature: %v at %v", err, at)
	}
	if _, err := journal.VerifyCosignature(w.VerifierKey(), journal.Checkpoint{Origin: origin, Size: 39, Root: cp.Root}, cosig); err == nil {
		t.Fatal("a cosignature verified for another checkpoint")
	}

	// The history survives a restart: a rollback is still one.
	w.Close()
	w2 := openWitness(t, dir, k)
	if latest, _ := w2.Latest(origin); latest.Size != 40 {
		t.Fatalf("reopened at %d, want 40", latest.Size)
	}
	src.size = 20
	rep := (&Monitor{W: w2, Origin: origin, Sources: []Source{src}}).Once(context.Background())
	if len(rep.Findings) != 1 || rep.Findings[0].Kind != KindRollback {
		t.Fatalf("after a restart, a smaller tree: %+v", rep.Findings)
	}
}

func TestAForkSignedWithTheLogKeyIsCaught(t *testing.T) {
	k := newLogKey(t)
	honest := newTree(30, nil)
	// The same key signs a tree whose entry 4 was rewritten.
	forked := newTree(30, map[int]string{4: "rewritten"})
	for _, tc := range []struct {
		name string
		size uint64
	}{{"same size", 10}, {"larger size", 25}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			w := openWitness(t, dir, k)
			reg := prometheus.NewRegistry()
			mt := NewMetrics(reg)
			good := &memSource{t: t, name: "ca", tr: honest, k: k, size: 10}
			if rep := (&Monitor{W: w, Origin: origin, Sources: []Source{good}, Metrics: mt}).Once(context.Background()); rep.Accepted != 10 {
				t.Fatalf("%+v", rep)
			}
			bad := &memSource{t: t, name: "attacker", tr: forked, k: k, size: tc.size}
			rep := (&Monitor{W: w, Origin: origin, Sources: []Source{bad}, Metrics: mt}).Once(context.Background())
			if len(rep.Findings) != 1 || rep.Findings[0].Kind != KindFork {
				t.Fatalf("findings %+v, want one fork", rep.Findings)
			}
			if rep.Accepted != 10 {
				t.Fatalf("accepted %d after a fork, want 10", rep.Accepted)
			}
			if ev := rep.Findings[0].Evidence; len(ev) != 1 {
				t.Fatalf("no evidence kept: %+v", rep.Findings[0])
			} else if b, err := os.ReadFile(ev[0]); err != nil || string(b) != string(forked.checkpoint(t, k, tc.size)) {
				t.Fatalf("evidence %s: %v", ev[0], err)
			}
			if got := counter(t, reg, "trustmesh_witness_findings_total", KindFork); got != 1 {
				t.Fatalf("fork metric %v, want 1", got)
			}
			sizes, _ := w.History(origin)
			if fmt.Sprint(sizes) != "[10]" {
				t.Fatalf("history %v after a fork, want [10]", sizes)
			}
		})
	}
}

func TestASplitViewIsRefused(t *testing.T) {
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	a := &memSource{t: t, name: "replica-a", tr: newTree(12, nil), k: k, size: 12}
	b := &memSource{t: t, name: "replica-b", tr: newTree(12, map[int]string{11: "other"}), k: k, size: 12}
	rep := (&Monitor{W: w, Origin: origin, Sources: []Source{a, b}}).Once(context.Background())
	if len(rep.Findings) != 1 || rep.Findings[0].Kind != KindSplitView || len(rep.Findings[0].Evidence) != 2 {
		t.Fatalf("findings %+v, want a split view with both checkpoints kept", rep.Findings)
	}
	if strings.Join(rep.Findings[0].Sources, ",") != "replica-a,replica-b" {
		t.Fatalf("sources %v", rep.Findings[0].Sources)
	}
	if rep.Accepted != 0 {
		t.Fatalf("accepted %d from a split view", rep.Accepted)
	}
}

func TestACheckpointNotSignedByTheLogKeyIsRefused(t *testing.T) {
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	other := newLogKey(t) // same origin, another key
	rep := (&Monitor{W: w, Origin: origin, Sources: []Source{&memSource{t: t, name: "x", tr: newTree(5, nil), k: other, size: 5}}}).Once(context.Background())
	if len(rep.Findings) != 1 || rep.Findings[0].Kind != "bad-signature" || rep.Accepted != 0 {
		t.Fatalf("%+v", rep)
	}
}

func TestTheLogKeyDoesNotChangeQuietly(t *testing.T) {
	dir := t.TempDir()
	k := newLogKey(t)
	w := openWitness(t, dir, k)
	w.Close()
	w2, err := Open(dir, "", time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	if _, err := w2.AddLog("", newLogKey(t).vkey); err == nil || !strings.Contains(err.Error(), "does not change quietly") {
		t.Fatalf("another key for the same origin: %v", err)
	}
	if got, err := w2.AddLog(origin, ""); err != nil || got != origin {
		t.Fatalf("the recorded key: %v", err)
	}
}

func TestAnAlteredHistoryIsAnError(t *testing.T) {
	dir := t.TempDir()
	k := newLogKey(t)
	w := openWitness(t, dir, k)
	tr := newTree(8, nil)
	if _, err := w.Add(tr.checkpoint(t, k, 8), 0, nil); err != nil {
		t.Fatal(err)
	}
	w.Close()
	// A checkpoint of size 5 put in the place of size 8's.
	path := filepath.Join(dir, "logs", logID(origin), "history", historyName(8))
	if err := os.WriteFile(path, tr.checkpoint(t, k, 5), 0o600); err != nil {
		t.Fatal(err)
	}
	w2, err := Open(dir, "", time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	if _, err := w2.AddLog("", k.vkey); err == nil || !strings.Contains(err.Error(), "holds a checkpoint of size 5") {
		t.Fatalf("reopening over an altered history: %v", err)
	}
}

func TestOneProcessHoldsTheDirectory(t *testing.T) {
	dir := t.TempDir()
	openWitness(t, dir, newLogKey(t))
	if _, err := Open(dir, "", time.Now); err == nil || !strings.Contains(err.Error(), "another process holds") {
		t.Fatalf("a second opener: %v", err)
	}
}

// TestTlogWitnessAPI drives the C2SP tlog-witness add-checkpoint endpoint
// as a log's client would.
func TestTlogWitnessAPI(t *testing.T) {
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	srv := httptest.NewServer(Handler(w))
	defer srv.Close()
	honest := newTree(20, nil)
	forked := newTree(20, map[int]string{2: "x"})
	post := func(old uint64, proof [][]byte, signed []byte) (int, string, string) {
		resp, err := http.Post(srv.URL+AddCheckpointPath, "text/plain", strings.NewReader(string(journal.AddCheckpointBody(old, proof, signed))))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, _ = fmt.Fprint(&b, readAll(t, resp))
		return resp.StatusCode, resp.Header.Get("Content-Type"), b.String()
	}
	proof := func(tr *tree, a, b uint64) [][]byte {
		p, err := journal.ConsistencyProof(tr.leaves[:b], a)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	if code, _, body := post(0, nil, honest.checkpoint(t, k, 6)); code != 200 || !strings.HasPrefix(body, "— witness.test/one ") {
		t.Fatalf("first checkpoint: %d %q", code, body)
	}
	if code, ct, body := post(3, proof(honest, 3, 12), honest.checkpoint(t, k, 12)); code != 409 || ct != "text/x.tlog.size" || body != "6\n" {
		t.Fatalf("wrong old size: %d %s %q", code, ct, body)
	}
	if code, _, body := post(6, proof(forked, 6, 12), forked.checkpoint(t, k, 12)); code != 422 {
		t.Fatalf("a fork with its own proof: %d %q", code, body)
	}
	if code, _, _ := post(6, proof(honest, 6, 12), newTree(20, nil).checkpoint(t, newLogKey(t), 12)); code != 403 {
		t.Fatalf("another key: %d", code)
	}
	if code, _, _ := post(6, nil, honest.checkpoint(t, k, 4)); code != 400 {
		t.Fatalf("a smaller tree: %d", code)
	}
	if code, _, body := post(6, nil, forked.checkpoint(t, k, 6)); code != 422 {
		t.Fatalf("another tree of the accepted size: %d %q", code, body)
	}
	if code, ct, body := post(0, nil, forked.checkpoint(t, k, 6)); code != 409 || ct != "text/x.tlog.size" || body != "6\n" {
		t.Fatalf("another tree of the accepted size, from a client that does not know it: %d %s %q", code, ct, body)
	}
	if code, ct, body := post(0, nil, honest.checkpoint(t, k, 4)); code != 409 || ct != "text/x.tlog.size" || body != "6\n" {
		t.Fatalf("a smaller tree from a client that does not know the accepted size: %d %s %q", code, ct, body)
	}
	code, _, body := post(6, proof(honest, 6, 12), honest.checkpoint(t, k, 12))
	if code != 200 {
		t.Fatalf("a consistent checkpoint: %d %q", code, body)
	}
	if _, err := journal.VerifyCosignature(w.VerifierKey(), journal.Checkpoint{Origin: origin, Size: 12, Root: honest.root(t, 12)}, []byte(body)); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := post(0, nil, []byte("other.example/log\n1\nAAAA\n\n— other.example/log AAAA\n")); code != 404 {
		t.Fatalf("an unknown log: %d", code)
	}
	for _, garbage := range []string{"not a request", "old x\n\n", "old 6\nnot-base64\n\n" + string(honest.checkpoint(t, k, 12))} {
		resp, err := http.Post(srv.URL+AddCheckpointPath, "text/plain", strings.NewReader(garbage))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("%q: %d", garbage, resp.StatusCode)
		}
	}
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return b.String()
}

// counter reads a counter with the given kind label from reg.
func counter(t *testing.T, reg *prometheus.Registry, name, kind string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == kind {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{kind=%q}", name, kind)
	return 0
}
