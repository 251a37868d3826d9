package check_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/check"
)

// testWitness is a tlog-witness's cosignature/v1 key pair.
type testWitness struct {
	name string
	vkey string
	priv ed25519.PrivateKey
}

func newTestWitness(t *testing.T, name string) testWitness {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	data := append([]byte{journal.AlgCosignatureV1}, pub...)
	hash := journal.NoteKeyHash(name, data)
	vkey := name + "+" + fmt.Sprintf("%08x", hash) + "+" + base64.StdEncoding.EncodeToString(data)
	return testWitness{name: name, vkey: vkey, priv: priv}
}

// cosign appends w's cosignature/v1 line at time at to the signed
// checkpoint note, as serve keeps it in DATA-DIR/witness-cosigned.checkpoint.
func (w testWitness) cosign(t *testing.T, note []byte, logKey string, at time.Time) []byte {
	t.Helper()
	cp, err := journal.ParseCheckpoint(note, logKey)
	if err != nil {
		t.Fatal(err)
	}
	_, pub, _ := strings.Cut(w.vkey[len(w.name)+1:], "+")
	raw, _ := base64.StdEncoding.DecodeString(pub)
	blob := binary.BigEndian.AppendUint32(nil, journal.NoteKeyHash(w.name, raw))
	blob = binary.BigEndian.AppendUint64(blob, uint64(at.Unix()))
	blob = append(blob, ed25519.Sign(w.priv, journal.CosignatureMessage(cp, uint64(at.Unix())))...)
	out := append([]byte{}, note...)
	return append(out, "— "+w.name+" "+base64.StdEncoding.EncodeToString(blob)+"\n"...)
}

// TestWitnessTlogCosigned: with a URL --witness (a C2SP tlog-witness,
// which serves nothing back) check never contacts the URL; it verifies
// the cosigned checkpoint serve keeps in the data directory with
// --witness-key, and holds the journal to it: none yet or behind is a
// warning; a cosignature that does not verify, no key, or a journal that
// no longer extends the cosigned checkpoint is an error.
func TestWitnessTlogCosigned(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	ctx := context.Background()
	store, _, err := dir.OpenJournal(ctx, "", admin.JournalOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	// A second entry and checkpoint, so that the witness can be behind.
	if _, err := store.Revoke(ctx, "spiffe://cluster.local/ns/default/sa/gone", now); err != nil {
		store.Close()
		t.Fatal(err)
	}
	cps, err := store.Checkpoints(ctx)
	store.Close()
	if err != nil || len(cps) < 2 {
		t.Fatalf("checkpoints: %v, %d", err, len(cps))
	}
	logKey, err := admin.CheckpointKey(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	// A tlog-witness answers 404/405 to a GET of its URL: check must not
	// ask it at all.
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}))
	defer srv.Close()
	url := srv.URL + "/witness"
	wit := newTestWitness(t, "witness.example/w1")
	cosignedFile := filepath.Join(string(dir), journal.WitnessCosignedFile)
	last := cps[len(cps)-1]
	cfg := check.Config{DataDir: dir, Now: now, Witness: url, WitnessKey: wit.vkey}

	// Nothing cosigned yet: a warning with the journal's size.
	rep := run(t, cfg)
	fs := wantOnly(t, rep, check.CodeWitnessCosigned, check.Warning)
	if !strings.Contains(fs[0].Message, "size "+itoa(last.Size)) {
		t.Errorf("the warning does not name the journal's size %d: %q", last.Size, fs[0].Message)
	}

	// The latest checkpoint cosigned: all well.
	at := now.Add(-time.Minute).Truncate(time.Second)
	write(t, cosignedFile, wit.cosign(t, last.Note, logKey, at))
	rep = run(t, cfg)
	fs = wantOnly(t, rep, check.CodeWitnessCosigned, check.OK)
	if !strings.Contains(fs[0].Message, "size "+itoa(last.Size)) || !strings.Contains(fs[0].Message, wit.name) {
		t.Errorf("the finding does not name the witness and size %d: %q", last.Size, fs[0].Message)
	}
	wantOnly(t, rep, check.CodeWitnessConsist, check.OK)
	if got := find(rep, check.CodeWitnessBehind); len(got) != 0 {
		t.Errorf("behind at the latest checkpoint: %+v", got)
	}
	if rep.Worst() > check.Info {
		t.Errorf("a healthy cosigned journal has findings: %+v", rep.Findings)
	}

	// An older checkpoint cosigned: behind, a warning with both sizes.
	write(t, cosignedFile, wit.cosign(t, cps[0].Note, logKey, at))
	rep = run(t, cfg)
	wantOnly(t, rep, check.CodeWitnessCosigned, check.OK)
	wantOnly(t, rep, check.CodeWitnessConsist, check.OK)
	fs = wantOnly(t, rep, check.CodeWitnessBehind, check.Warning)
	if !strings.Contains(fs[0].Message, itoa(cps[0].Size)) || !strings.Contains(fs[0].Message, itoa(last.Size)) {
		t.Errorf("the warning does not name sizes %d and %d: %q", cps[0].Size, last.Size, fs[0].Message)
	}

	// Cosigned by another witness key, or a cosignature altered: an error,
	// and the journal is not held to it.
	other := newTestWitness(t, wit.name)
	good := wit.cosign(t, last.Note, logKey, at)
	flipped := append([]byte{}, good...)
	flipped[len(flipped)-6] ^= 0x01
	for name, b := range map[string][]byte{
		"another witness key":   other.cosign(t, last.Note, logKey, at),
		"a flipped signature":   flipped,
		"no cosignature at all": last.Note,
	} {
		write(t, cosignedFile, b)
		rep = run(t, cfg)
		wantOnly(t, rep, check.CodeWitnessCosigned, check.Error)
		if got := find(rep, check.CodeWitnessConsist); len(got) != 0 {
			t.Errorf("%s: the journal was held to an unverified checkpoint: %+v", name, got)
		}
	}

	// No --witness-key: the cosignature cannot be verified, an error.
	write(t, cosignedFile, good)
	rep = run(t, check.Config{DataDir: dir, Now: now, Witness: url})
	wantOnly(t, rep, check.CodeWitnessCosigned, check.Error)

	// The journal cut back below what the witness cosigned: a rollback.
	db, err := sql.Open("sqlite", dir.JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DELETE FROM entries WHERE idx >= $1`, `DELETE FROM checkpoints WHERE size >= $1`} {
		if _, err := db.Exec(q, last.Size-1); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	rep = run(t, cfg)
	wantOnly(t, rep, check.CodeWitnessCosigned, check.OK)
	fs = wantOnly(t, rep, check.CodeWitnessConsist, check.Error)
	if !strings.Contains(fs[0].Message, "rollback") {
		t.Errorf("the error does not name a possible rewrite or rollback: %q", fs[0].Message)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("check asked the tlog-witness URL %d times", n)
	}
}

// TestWitnessKeyValidated: --witness-key belongs to a URL witness and must
// be a cosignature/v1 key; check refuses to run otherwise.
func TestWitnessKeyValidated(t *testing.T) {
	dir := admin.DataDir(t.TempDir())
	logLike := "log.example+01234567+" + base64.StdEncoding.EncodeToString(append([]byte{1}, make([]byte, 32)...))
	wit := newTestWitness(t, "witness.example/w1")
	for name, cfg := range map[string]check.Config{
		"a key with a file witness": {Witness: "/var/lib/witness", WitnessKey: wit.vkey},
		"not a cosignature/v1 key":  {Witness: "https://witness.example/w", WitnessKey: logLike},
		"garbage":                   {Witness: "https://witness.example/w", WitnessKey: "x"},
	} {
		cfg.DataDir, cfg.Now = dir, time.Now()
		if _, err := check.Run(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "--witness-key") {
			t.Errorf("%s: Run = %v, want a --witness-key error", name, err)
		}
	}
}

func write(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(name, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }
