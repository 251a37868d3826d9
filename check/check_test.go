package check_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"database/sql"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/check"
)

// newDataDir sets up a data directory as serve does on first start: the
// journal bound to a trust domain, its checkpoint key, and the first CA
// generation, with intermediates of interLife (zero: the default), on a
// clock at now.
func newDataDir(t *testing.T, now time.Time, interLife time.Duration) admin.DataDir {
	t.Helper()
	ctx := context.Background()
	dir := admin.DataDir(t.TempDir())
	store, td, err := dir.OpenJournal(ctx, "cluster.local", admin.JournalOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	clk := clocktesting.NewFakeClock(now)
	rot, err := rotation.New(rotation.Config{Dir: dir.CADir(), TrustDomain: td, Recorder: store,
		Clock: clk, IntermediateLifetime: interLife})
	if err != nil {
		t.Fatal(err)
	}
	mat, err := rot.Initial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Serve's first issuance: its own serving certificate.
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: authority.New(td, mat), Recorder: store, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.IssueServing(ctx, ca.ServingRequest{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
		DNSNames: []string{"localhost"}, PublicKey: key.Public(), TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func run(t *testing.T, cfg check.Config) *check.Report {
	t.Helper()
	rep, err := check.Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// find returns the findings with code.
func find(rep *check.Report, code string) []check.Finding {
	var out []check.Finding
	for _, f := range rep.Findings {
		if f.Code == code {
			out = append(out, f)
		}
	}
	return out
}

// wantOnly fails unless every finding with code has severity sev, and
// there is at least one.
func wantOnly(t *testing.T, rep *check.Report, code string, sev check.Severity) []check.Finding {
	t.Helper()
	fs := find(rep, code)
	if len(fs) == 0 {
		t.Fatalf("no %s finding in %+v", code, rep.Findings)
	}
	for _, f := range fs {
		if f.Severity != sev {
			t.Errorf("%s: %s %q, want %s", code, f.Severity, f.Message, sev)
		}
		if f.Severity > check.OK && f.Hint == "" && f.Severity != check.Info {
			t.Errorf("%s %s has no hint", code, f.Severity)
		}
	}
	return fs
}

func TestHealthyFreshDataDir(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	policies := t.TempDir()
	rep := run(t, check.Config{DataDir: dir, Now: now, Policies: policies})
	if w := rep.Worst(); w > check.Info {
		t.Fatalf("a fresh data directory is %s:\n%+v", w, rep.Findings)
	}
	for _, code := range []string{check.CodeCARead, check.CodeRoot, check.CodeIntermediate, check.CodeJournalOpen,
		check.CodeJournalIntact, check.CodeCheckpointAge, check.CodePolicies} {
		wantOnly(t, rep, code, check.OK)
	}
	// The rotation plan of a fresh CA: prepare the next intermediate at
	// half the intermediate's life.
	if rep.Rotation == nil || rep.Rotation.Next != rotation.PrepareIntermediate ||
		rep.Rotation.At.Before(now.Add(150*24*time.Hour)) || rep.Rotation.At.After(now.Add(190*24*time.Hour)) {
		t.Errorf("rotation plan %+v, want prepare-intermediate in about half a year", rep.Rotation)
	}
}

func TestIntermediateWithinMinValidity(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 10*24*time.Hour)
	rep := run(t, check.Config{DataDir: dir, Now: now, MinValidity: 30 * 24 * time.Hour})
	fs := wantOnly(t, rep, check.CodeIntermediate, check.Warning)
	if !strings.Contains(fs[0].Message, "--min-validity") {
		t.Errorf("message %q does not name --min-validity", fs[0].Message)
	}
	wantOnly(t, rep, check.CodeRoot, check.OK)
	if rep.Worst() != check.Warning {
		t.Errorf("worst %s, want warning:\n%+v", rep.Worst(), rep.Findings)
	}
	// Past its end, an error.
	rep = run(t, check.Config{DataDir: dir, Now: now.Add(11 * 24 * time.Hour)})
	wantOnly(t, rep, check.CodeIntermediate, check.Error)
	// The checkpoint is eleven days old by then.
	wantOnly(t, rep, check.CodeCheckpointAge, check.Warning)
}

func TestTamperedJournal(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	db, err := sql.Open("sqlite", dir.JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	res, err := db.Exec(`DELETE FROM entries WHERE idx = (SELECT MAX(idx) FROM entries)`)
	if n, _ := res.RowsAffected(); err != nil || n != 1 {
		t.Fatalf("tamper: %v, %d rows", err, n)
	}
	db.Close()
	rep := run(t, check.Config{DataDir: dir, Now: now})
	wantOnly(t, rep, check.CodeJournalIntact, check.Error)
	if rep.Worst() != check.Error {
		t.Errorf("worst %s, want error", rep.Worst())
	}
}

func TestBadPolicyFile(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	policies := t.TempDir()
	if err := os.WriteFile(filepath.Join(policies, "broken.yaml"), []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: default}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        method: ["GET"]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	rep := run(t, check.Config{DataDir: dir, Now: now, Policies: policies})
	fs := wantOnly(t, rep, check.CodePolicies, check.Error)
	if !strings.Contains(fs[0].Message, "broken.yaml") {
		t.Errorf("message %q does not name the file", fs[0].Message)
	}
}

func TestBadMeshFile(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	m := t.TempDir()
	if err := os.WriteFile(filepath.Join(m, "mesh.yaml"), []byte("services: [{name: a, ports: [{port: notanumber}]}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rep := run(t, check.Config{DataDir: dir, Now: now, Mesh: m})
	fs := wantOnly(t, rep, check.CodeMesh, check.Error)
	if !strings.Contains(fs[0].Message, "mesh.yaml") {
		t.Errorf("message %q does not name the file", fs[0].Message)
	}
}

func TestMissingDataDir(t *testing.T) {
	rep := run(t, check.Config{DataDir: admin.DataDir(filepath.Join(t.TempDir(), "missing")), Now: time.Now()})
	wantOnly(t, rep, check.CodeJournalOpen, check.Error)
	wantOnly(t, rep, check.CodeCARead, check.Error)
}

// TestWitness: a witness file with the journal's latest checkpoint is
// consistent; one from before the journal was cut is not; a missing file
// is unreachable. (A URL witness: TestWitnessTlogCosigned.)
func TestWitness(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	ctx := context.Background()
	store, _, err := dir.OpenJournal(ctx, "", admin.JournalOptions{}, true)
	if err != nil {
		t.Fatal(err)
	}
	cps, err := store.Checkpoints(ctx)
	store.Close()
	if err != nil || len(cps) == 0 {
		t.Fatalf("checkpoints: %v, %d", err, len(cps))
	}
	witness := filepath.Join(t.TempDir(), "witness")
	if err := os.WriteFile(witness, cps[len(cps)-1].Note, 0o600); err != nil {
		t.Fatal(err)
	}
	rep := run(t, check.Config{DataDir: dir, Now: now, Witness: witness})
	wantOnly(t, rep, check.CodeWitnessReach, check.OK)
	wantOnly(t, rep, check.CodeWitnessConsist, check.OK)

	// Cut the journal and its checkpoints back: it verifies on its own,
	// but no longer holds what the witness saw.
	db, err := sql.Open("sqlite", dir.JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	size := cps[len(cps)-1].Size
	for _, q := range []string{`DELETE FROM entries WHERE idx >= $1`, `DELETE FROM checkpoints WHERE size >= $1`} {
		if _, err := db.Exec(q, size-1); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	rep = run(t, check.Config{DataDir: dir, Now: now, Witness: witness})
	wantOnly(t, rep, check.CodeWitnessConsist, check.Error)

	rep = run(t, check.Config{DataDir: dir, Now: now, Witness: filepath.Join(t.TempDir(), "missing")})
	wantOnly(t, rep, check.CodeWitnessReach, check.Error)
}

func TestParseFailOnAndDuration(t *testing.T) {
	for _, s := range []string{"info", "warning", "error"} {
		if _, err := check.ParseFailOn(s); err != nil {
			t.Errorf("ParseFailOn(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"ok", "critical", ""} {
		if _, err := check.ParseFailOn(s); err == nil {
			t.Errorf("ParseFailOn(%q) accepted", s)
		}
	}
	for s, want := range map[string]time.Duration{"30d": 30 * 24 * time.Hour, "1d12h": 36 * time.Hour, "36h": 36 * time.Hour, "90m": 90 * time.Minute} {
		if got, err := check.ParseDuration(s); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, s := range []string{"d", "30", "x1d", "1dd", "-1d"} {
		if _, err := check.ParseDuration(s); err == nil {
			t.Errorf("ParseDuration(%q) accepted", s)
		}
	}
}

// TestWitnessURLCredentialsNotShown: a witness URL's user information and
// query carry credentials; the findings name the witness without them,
// with or without --witness-key, whether or not it answers (check does not
// ask it), or spelled with an upper-case scheme (once taken for a file
// path and shown whole).
func TestWitnessURLCredentialsNotShown(t *testing.T) {
	now := time.Now()
	dir := newDataDir(t, now, 0)
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "no", http.StatusInternalServerError)
	}))
	defer failing.Close()
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	for _, base := range []string{failing.URL, gone.URL, strings.Replace(failing.URL, "http://", "HTTP://", 1)} {
		witness := strings.Replace(base, "://", "://alice:s3cretpw@", 1) + "/w?api_key=k3ysecret"
		for _, key := range []string{"", newTestWitness(t, "witness.example/w").vkey} {
			rep := run(t, check.Config{DataDir: dir, Now: now, Witness: witness, WitnessKey: key, Timeout: 2 * time.Second})
			fs := find(rep, check.CodeWitnessCosigned)
			if len(fs) == 0 {
				t.Fatalf("no %s finding in %+v", check.CodeWitnessCosigned, rep.Findings)
			}
			for _, f := range rep.Findings {
				for _, secret := range []string{"s3cretpw", "k3ysecret", "alice"} {
					if strings.Contains(f.Subject+f.Message+f.Hint, secret) {
						t.Errorf("%s: the finding shows %q: %+v", base, secret, f)
					}
				}
			}
		}
	}
}
