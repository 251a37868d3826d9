package witnessoracle

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/torchwood"
	"github.com/transparency-dev/formats/log"
	fnote "github.com/transparency-dev/formats/note"
	fwitness "github.com/transparency-dev/formats/witness"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/witness"
)

const trustDomain = "oracle.example"

// dataDir is a trustmesh data directory whose journal grows by one
// rotation entry per record call, as serve's does.
type dataDir struct {
	t    *testing.T
	dir  string
	vkey string
}

func newDataDir(t *testing.T) *dataDir {
	t.Helper()
	d := &dataDir{t: t, dir: filepath.Join(t.TempDir(), "data")}
	s := d.open(nil)
	s.Close()
	b, err := os.ReadFile(admin.DataDir(d.dir).CheckpointPubPath())
	if err != nil {
		t.Fatal(err)
	}
	d.vkey = strings.TrimSpace(string(b))
	return d
}

// open opens the journal with w as its witness (nil for none).
func (d *dataDir) open(w journal.Witness) *journal.Store {
	d.t.Helper()
	s, _, err := admin.DataDir(d.dir).OpenJournal(context.Background(), trustDomain, admin.JournalOptions{Witness: w}, false)
	if err != nil {
		d.t.Fatal(err)
	}
	return s
}

// record appends n entries named prefix-i.
func record(t *testing.T, s *journal.Store, prefix string, n int) {
	t.Helper()
	for i := range n {
		if err := s.RecordRotation(context.Background(), journal.Rotation{Step: "prepare", Role: "intermediate", Serial: fmt.Sprintf("%s-%d", prefix, i), Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
}

// copyTo copies the data directory (closed) to a new one: the same
// checkpoint key and history, from which the two may fork.
func (d *dataDir) copyTo(t *testing.T) *dataDir {
	t.Helper()
	c := &dataDir{t: t, dir: filepath.Join(t.TempDir(), "fork"), vkey: d.vkey}
	if out, err := exec.Command("cp", "-a", d.dir, c.dir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return c
}

// TestJournalCheckpointsParseWithForeignCode: every checkpoint trustmesh's
// journal signs opens with transparency-dev/formats' Ed25519 verifier and
// parser and with torchwood's C2SP tlog-checkpoint parser, which agree with
// ours on origin, size and root; and the journal's consistency proofs
// between them verify with golang.org/x/mod/sumdb/tlog.
func TestJournalCheckpointsParseWithForeignCode(t *testing.T) {
	ctx := context.Background()
	d := newDataDir(t)
	s := d.open(nil)
	defer s.Close()
	record(t, s, "entry", 9)
	stored, err := s.Checkpoints(ctx)
	if err != nil || len(stored) < 2 {
		t.Fatalf("checkpoints: %d, %v", len(stored), err)
	}
	v, err := fnote.NewVerifier(d.vkey)
	if err != nil {
		t.Fatalf("formats refuses the journal's verifier key %q: %v", d.vkey, err)
	}
	origin := "trustmesh.journal/" + trustDomain
	var prev *torchwood.Checkpoint
	for _, sc := range stored {
		ours, err := journal.ParseCheckpoint(sc.Note, d.vkey)
		if err != nil {
			t.Fatal(err)
		}
		fcp, _, n, err := log.ParseCheckpoint(sc.Note, origin, v)
		if err != nil {
			t.Fatalf("size %d: formats: %v\n%s", sc.Size, err, sc.Note)
		}
		if fcp.Origin != ours.Origin || fcp.Size != ours.Size || !bytes.Equal(fcp.Hash, ours.Root) {
			t.Fatalf("formats reads %+v, we read %+v", fcp, ours)
		}
		tcp, err := torchwood.ParseCheckpoint(n.Text)
		if err != nil {
			t.Fatalf("size %d: torchwood: %v", sc.Size, err)
		}
		if tcp.Origin != ours.Origin || uint64(tcp.N) != ours.Size || !bytes.Equal(tcp.Hash[:], ours.Root) || tcp.String() != n.Text {
			t.Fatalf("torchwood reads %+v (%q), we read %+v (%q)", tcp, tcp.String(), ours, n.Text)
		}
		if prev != nil && prev.N > 0 {
			p, err := s.ConsistencyBetween(ctx, uint64(prev.N), ours.Size)
			if err != nil {
				t.Fatal(err)
			}
			proof := make(tlog.TreeProof, len(p))
			for i, h := range p {
				copy(proof[i][:], h)
			}
			if err := tlog.CheckTree(proof, tcp.N, tcp.Hash, prev.N, prev.Hash); err != nil {
				t.Fatalf("x/mod/sumdb/tlog refuses our proof from %d to %d: %v", prev.N, tcp.N, err)
			}
			if len(proof) > 0 {
				proof[0][0] ^= 1
				if tlog.CheckTree(proof, tcp.N, tcp.Hash, prev.N, prev.Hash) == nil {
					t.Fatalf("a tampered proof from %d to %d verifies", prev.N, tcp.N)
				}
			}
		}
		prev = &tcp
	}
}

// TestOurCosignaturesVerifyWithForeignCode: a cosignature made by the
// tlog-witness endpoint `trustmesh audit monitor --listen` serves
// (witness.Handler) verifies with transparency-dev/formats'
// cosignature/v1 verifier, and torchwood reads its timestamp; a tampered
// one (time, signature or checkpoint) does not verify. The other way, a
// cosignature torchwood makes verifies with ours.
func TestOurCosignaturesVerifyWithForeignCode(t *testing.T) {
	ctx := context.Background()
	d := newDataDir(t)
	s := d.open(nil)
	defer s.Close()
	record(t, s, "entry", 5)
	latest, err := s.LatestCheckpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 6, 5, 0, 0, 0, time.UTC)
	w, err := witness.Open(t.TempDir(), "witness.oracle.example/ours", func() time.Time { return at })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.AddLog("", d.vkey); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(witness.Handler(w))
	defer srv.Close()
	resp, err := http.Post(srv.URL+witness.AddCheckpointPath, "text/plain", bytes.NewReader(journal.AddCheckpointBody(0, nil, latest.Note)))
	if err != nil {
		t.Fatal(err)
	}
	line, _ := readAll(resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("add-checkpoint: %s %q", resp.Status, line)
	}
	cosigned := append(append([]byte{}, latest.Note...), line...)

	logV, err := fnote.NewVerifier(d.vkey)
	if err != nil {
		t.Fatal(err)
	}
	cosigV, err := fnote.NewVerifierForCosignatureV1(w.VerifierKey())
	if err != nil {
		t.Fatalf("formats refuses our witness key %q: %v", w.VerifierKey(), err)
	}
	n, err := note.Open(cosigned, note.VerifierList(logV, cosigV))
	if err != nil {
		t.Fatalf("formats: %v\n%s", err, cosigned)
	}
	var found bool
	for _, sig := range n.Sigs {
		if sig.Name != cosigV.Name() || sig.Hash != cosigV.KeyHash() {
			continue
		}
		found = true
		ft, err := fnote.CoSigV1Timestamp(sig)
		if err != nil || !ft.Equal(at) {
			t.Errorf("formats reads the cosignature's time as %v, %v; want %v", ft, err, at)
		}
		tt, err := torchwood.CosignatureTimestamp(sig)
		if err != nil || tt != at.Unix() {
			t.Errorf("torchwood reads the cosignature's time as %d, %v; want %d", tt, err, at.Unix())
		}
	}
	if !found {
		t.Fatalf("formats did not verify the witness's cosignature:\n%s", cosigned)
	}
	root, _ := url.Parse(srv.URL)
	policy, err := fwitness.New(w.VerifierKey(), root)
	if err != nil {
		t.Fatal(err)
	}
	if !policy.Satisfied(cosigned) {
		t.Fatalf("formats' witness policy is not satisfied by our witness's cosignature:\n%s", cosigned)
	}

	// Tampered: each must fail formats' verifier.
	blob := func(l []byte) []byte {
		f := strings.Fields(string(l))
		b, err := base64.StdEncoding.DecodeString(f[len(f)-1])
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	relabel := func(b []byte) []byte {
		return []byte("— " + cosigV.Name() + " " + base64.StdEncoding.EncodeToString(b) + "\n")
	}
	laterTime := blob(line)
	laterTime[11]++
	badSig := blob(line)
	badSig[len(badSig)-1] ^= 1
	otherCheckpoint, err := note.Sign(&note.Note{Text: strings.Replace(n.Text, "\n5\n", "\n4\n", 1)}, mustSigner(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, tampered := range map[string][]byte{
		"a later time":   append(append([]byte{}, latest.Note...), relabel(laterTime)...),
		"a flipped bit":  append(append([]byte{}, latest.Note...), relabel(badSig)...),
		"another tree":   append(otherCheckpoint, line...),
		"the wrong name": append(append([]byte{}, latest.Note...), bytes.Replace(line, []byte("ours"), []byte("ourz"), 1)...),
	} {
		n, err := note.Open(tampered, note.VerifierList(cosigV))
		if err == nil {
			t.Errorf("%s: formats verified a tampered cosignature (%d sigs)", name, len(n.Sigs))
		}
		if policy.Satisfied(tampered) {
			t.Errorf("%s: formats' witness policy is satisfied by a tampered cosignature", name)
		}
	}

	// The other way: torchwood's cosigner, our verifier.
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := torchwood.NewCosignatureSigner("witness.oracle.example/torchwood", priv)
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := note.Sign(&note.Note{Text: n.Text}, ts)
	if err != nil {
		t.Fatal(err)
	}
	_, sigs, _ := bytes.Cut(theirs, []byte("\n\n"))
	cp, err := journal.ParseCheckpoint(latest.Note, d.vkey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := journal.VerifyCosignature(ts.Verifier().String(), cp, sigs); err != nil {
		t.Fatalf("our verifier refuses torchwood's cosignature %q with key %s: %v", sigs, ts.Verifier(), err)
	}
	cp.Size--
	if _, err := journal.VerifyCosignature(ts.Verifier().String(), cp, sigs); !errors.Is(err, journal.ErrCosignature) {
		t.Fatalf("our verifier accepts torchwood's cosignature for another tree: %v", err)
	}
}

// TestLitewitnessCosignsServesExport drives torchwood's litewitness, a
// C2SP tlog-witness written by someone else, with serve's checkpoint
// export (journal.ExportWitness, attached to a real journal as serve
// attaches it): it cosigns each checkpoint, and the kept cosignature
// verifies; a restarted CA re-syncs through its 409; a fork signed with
// the same checkpoint key (a copy of the data directory that went its own
// way) and a rolled-back copy are refused, and serve's export says
// "inconsistent".
func TestLitewitnessCosignsServesExport(t *testing.T) {
	ctx := context.Background()
	bin := buildTools(t)
	d := newDataDir(t)
	s := d.open(nil)
	record(t, s, "shared", 4)
	s.Close()
	forkLarger, forkSame, rolledBack := d.copyTo(t), d.copyTo(t), d.copyTo(t)

	lw := startLitewitness(t, bin, "trustmesh.journal/"+trustDomain, d.vkey)
	cosigned := filepath.Join(d.dir, journal.WitnessCosignedFile)
	newExport := func(key string) *journal.ExportWitness {
		e, err := journal.NewExport(journal.ExportConfig{Target: lw.url, Key: key, Cosigned: cosigned})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}

	e := newExport(lw.vkey)
	s = d.open(e)
	if err := e.Attach(ctx, s); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(ctx); err != nil {
		t.Fatalf("litewitness refused the journal's first checkpoint: %v", err)
	}
	for i := range 3 {
		record(t, s, fmt.Sprintf("honest-%d", i), 2)
		if err := e.Flush(ctx); err != nil {
			t.Fatalf("litewitness refused a grown journal: %v", err)
		}
	}
	latest, err := s.LatestCheckpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st := e.Status(); st.Cosigned != latest.Size || st.LastError != "" {
		t.Fatalf("status %+v, want cosigned %d", st, latest.Size)
	}
	checkKept(t, cosigned, d.vkey, lw.vkey, latest.Size)
	s.Close()

	// A restart: the export does not know litewitness's size until its
	// 409 says it.
	e = newExport(lw.vkey)
	s = d.open(e)
	if err := e.Attach(ctx, s); err != nil {
		t.Fatal(err)
	}
	record(t, s, "after-restart", 1)
	if err := e.Flush(ctx); err != nil {
		t.Fatalf("after a restart: %v", err)
	}
	honestSize := e.Status().Cosigned
	if honestSize != latest.Size+1 {
		t.Fatalf("after a restart: cosigned %d, want %d", honestSize, latest.Size+1)
	}
	s.Close()

	for _, c := range []struct {
		name string
		d    *dataDir
		grow int
	}{
		{"a larger fork signed with the checkpoint key", forkLarger, 20},
		{"a fork of the cosigned size", forkSame, int(honestSize) - 4},
		{"a rolled-back copy", rolledBack, 0},
	} {
		e := newExport(lw.vkey)
		s := c.d.open(e)
		record(t, s, "forked-"+c.name, c.grow)
		if err := e.Attach(ctx, s); err != nil {
			t.Fatal(err)
		}
		err := e.Flush(ctx)
		var we *journal.WitnessError
		if !errors.As(err, &we) || we.Reason != journal.ReasonInconsistent {
			t.Errorf("%s: %v, want reason %s", c.name, err, journal.ReasonInconsistent)
		}
		s.Close()
		checkKept(t, cosigned, d.vkey, lw.vkey, honestSize)
	}

	// The witness's key is not the one configured: nothing is kept.
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	otherSigner, err := torchwood.NewCosignatureSigner("example.com/witness", other)
	if err != nil {
		t.Fatal(err)
	}
	e = newExport(otherSigner.Verifier().String())
	s = d.open(e)
	defer s.Close()
	if err := e.Attach(ctx, s); err != nil {
		t.Fatal(err)
	}
	record(t, s, "other-key", 1)
	err = e.Flush(ctx)
	var we *journal.WitnessError
	if !errors.As(err, &we) || we.Reason != journal.ReasonBadCosignature {
		t.Errorf("a cosignature by another key: %v, want reason %s", err, journal.ReasonBadCosignature)
	}
	checkKept(t, cosigned, d.vkey, lw.vkey, honestSize)
}

// checkKept checks the cosigned checkpoint serve keeps: the log's
// signature and the witness's, verified by formats, at size want.
func checkKept(t *testing.T, path, logKey, witnessKey string, want uint64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	logV, err := fnote.NewVerifier(logKey)
	if err != nil {
		t.Fatal(err)
	}
	cosigV, err := fnote.NewVerifierForCosignatureV1(witnessKey)
	if err != nil {
		t.Fatal(err)
	}
	cp, _, n, err := log.ParseCheckpoint(b, "trustmesh.journal/"+trustDomain, logV, cosigV)
	if err != nil {
		t.Fatalf("the kept checkpoint: %v\n%s", err, b)
	}
	if len(n.Sigs) != 2 || cp.Size != want {
		t.Fatalf("the kept checkpoint is size %d with %d verified signatures, want %d with the log's and the witness's", cp.Size, len(n.Sigs), want)
	}
	// formats' witness policy, as a verifier that requires this
	// witness's cosignature applies it.
	root, _ := url.Parse("http://witness.invalid/prefix")
	policy, err := fwitness.New(witnessKey, root)
	if err != nil {
		t.Fatal(err)
	}
	if !policy.Satisfied(b) {
		t.Fatalf("formats' witness policy is not satisfied by the kept checkpoint:\n%s", b)
	}
	if _, ok := policy.Endpoints()["http://witness.invalid/prefix"+journal.AddCheckpointPath]; !ok {
		t.Fatalf("formats posts to %v; serve posts to --witness + %s", policy.Endpoints(), journal.AddCheckpointPath)
	}
}

func mustSigner(t *testing.T) note.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := journal.NewCheckpointSigner("trustmesh.journal/"+trustDomain, priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readAll(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	var b bytes.Buffer
	_, err := b.ReadFrom(resp.Body)
	return b.Bytes(), err
}

type tools struct{ litewitness, witnessctl string }

// buildTools builds torchwood's litewitness and witnessctl at the version
// go.mod names.
func buildTools(t *testing.T) tools {
	t.Helper()
	dir := t.TempDir()
	bt := tools{litewitness: filepath.Join(dir, "litewitness"), witnessctl: filepath.Join(dir, "witnessctl")}
	for pkg, out := range map[string]string{"filippo.io/torchwood/cmd/litewitness": bt.litewitness, "filippo.io/torchwood/cmd/witnessctl": bt.witnessctl} {
		if b, err := exec.Command("go", "build", "-o", out, pkg).CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, b)
		}
	}
	return bt
}

type litewitness struct {
	url  string
	vkey string
}

// startLitewitness runs litewitness with a fresh Ed25519 key, served by an
// in-process ssh-agent (litewitness signs only through one), following
// the log origin with the checkpoint key vkey.
func startLitewitness(t *testing.T, bt tools, origin, logVKey string) litewitness {
	t.Helper()
	dir := t.TempDir()
	db := filepath.Join(dir, "litewitness.db")
	for _, args := range [][]string{
		{"add-log", "-db", db, "-origin", origin},
		{"add-key", "-db", db, "-origin", origin, "-key", logVKey},
	} {
		if b, err := exec.Command(bt.witnessctl, args...).CombinedOutput(); err != nil {
			t.Fatalf("witnessctl %v: %v\n%s", args, err, b)
		}
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keyring := agent.NewKeyring()
	if err := keyring.Add(agent.AddedKey{PrivateKey: priv}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = agent.ServeAgent(keyring, c)
			}()
		}
	}()
	pub, err := ssh.NewPublicKey(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	const name = "example.com/witness"
	cmd := exec.Command(bt.litewitness, "-db", db, "-name", name, "-ssh-agent", sock,
		"-key", ssh.FingerprintSHA256(pub), "-listen", port)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("litewitness:\n%s", stderr.String())
		}
	})
	url := "http://" + port
	for deadline := time.Now().Add(30 * time.Second); ; {
		if c, err := net.Dial("tcp", port); err == nil {
			c.Close()
			break
		}
		select {
		case <-done:
			t.Fatalf("litewitness exited:\n%s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("litewitness did not listen:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	s, err := torchwood.NewCosignatureSigner(name, priv)
	if err != nil {
		t.Fatal(err)
	}
	return litewitness{url: url, vkey: s.Verifier().String()}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestServePushesToLitewitness runs the real `trustmesh serve --witness
// URL --witness-key VKEY` against torchwood's litewitness: at start serve
// offers its latest checkpoint, litewitness cosigns it, and the
// cosignature serve keeps in its data directory verifies with
// transparency-dev/formats. Set WITNESS_ORACLE_TRUSTMESH to a built
// trustmesh binary to skip the build.
func TestServePushesToLitewitness(t *testing.T) {
	bt := buildTools(t)
	tm := os.Getenv("WITNESS_ORACLE_TRUSTMESH")
	if tm == "" {
		tm = filepath.Join(t.TempDir(), "trustmesh")
		build := exec.Command("go", "build", "-o", tm, "./cmd/trustmesh")
		build.Dir = filepath.Join("..", "..")
		if b, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building trustmesh: %v\n%s", err, b)
		}
	}
	data := filepath.Join(t.TempDir(), "data")
	serve := func(extra ...string) (stop func()) {
		t.Helper()
		monitoring := freePort(t)
		cmd := exec.Command(tm, append([]string{"serve", "--data-dir", data, "--listen-ca", freePort(t), "--listen-monitoring", monitoring,
			"--listen-bundle", "", "--listen-ui", "off", "--kubernetes", "off", "--decision-log", ""}, extra...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if resp, err := http.Get("http://" + monitoring + "/readyz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			if time.Now().After(deadline) {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("serve did not become ready:\n%s", stderr.String())
			}
		}
		return func() {
			_ = cmd.Process.Signal(os.Interrupt)
			if err := cmd.Wait(); err != nil {
				t.Errorf("serve: %v\n%s", err, stderr.String())
			}
			if t.Failed() {
				t.Logf("serve:\n%s", stderr.String())
			}
		}
	}
	serve()()
	for i := range 3 {
		if b, err := exec.Command(tm, "ca", "token", "create", "--data-dir", data, "--spiffe-id", fmt.Sprintf("spiffe://cluster.local/ns/oracle/sa/w%d", i)).CombinedOutput(); err != nil {
			t.Fatalf("ca token create: %v\n%s", err, b)
		}
	}
	pub, err := os.ReadFile(filepath.Join(data, "checkpoint.pub"))
	if err != nil {
		t.Fatal(err)
	}
	logKey := strings.TrimSpace(string(pub))
	origin, _, _ := strings.Cut(logKey, "+")
	lw := startLitewitness(t, bt, origin, logKey)
	stop := serve("--witness", lw.url, "--witness-key", lw.vkey)
	defer stop()
	cosigned := filepath.Join(data, journal.WitnessCosignedFile)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(cosigned); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("serve kept no cosignature from litewitness")
		}
	}
	b, err := os.ReadFile(cosigned)
	if err != nil {
		t.Fatal(err)
	}
	logV, err := fnote.NewVerifier(logKey)
	if err != nil {
		t.Fatal(err)
	}
	cosigV, err := fnote.NewVerifierForCosignatureV1(lw.vkey)
	if err != nil {
		t.Fatal(err)
	}
	cp, _, n, err := log.ParseCheckpoint(b, origin, logV, cosigV)
	if err != nil || len(n.Sigs) != 2 || cp.Size < 3 {
		t.Fatalf("the kept checkpoint: %v, %d verified signatures, size %v\n%s", err, len(n.Sigs), cp, b)
	}
}
