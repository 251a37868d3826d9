// Package postgres_test injects PostgreSQL faults under the real
// `trustmesh serve` with --journal-dsn: the database killed in the middle of
// a burst of issuances and restarted, and one of two replicas on one
// database killed during its commits.
package postgres_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestPostgresKilledMidBurst SIGKILLs PostgreSQL while workloads renew
// through one `trustmesh serve`, then starts it again. While it is down every
// issuance fails closed with Unavailable and the log says the journal is
// unavailable; once it is back issuance resumes in the same process; every
// certificate a client received is in the journal with its hash, and audit
// verify passes.
func TestPostgresKilledMidBurst(t *testing.T) {
	pg := startPostgres(t)
	shared := newSharedCA(t)
	dataDir := t.TempDir()
	jflags := shared.journalFlags(dataDir, pg.dsn)
	p := startServe(t, append(jflags, "--cacerts", shared.cacerts)...)
	ws := enrol(t, 4, p.ca, shared.roots, jflags)

	stop := make(chan struct{})
	out := make(chan outcome, 1<<16)
	wg := burst(p.ca, shared.roots, ws, stop, out)
	var got []outcome
	collect := func(until func() bool, max time.Duration) {
		deadline := time.After(max)
		for !until() {
			select {
			case o := <-out:
				got = append(got, o)
			case <-deadline:
				return
			}
		}
	}
	successes := func(from time.Time) (n int) {
		for _, o := range got {
			if o.err == nil && o.at.After(from) {
				n++
			}
		}
		return n
	}
	collect(func() bool { return successes(time.Time{}) >= 40 }, 30*time.Second)
	if n := successes(time.Time{}); n < 40 {
		t.Fatalf("only %d renewals before the fault", n)
	}

	killed := time.Now()
	pg.kill()
	// Down for long enough that every workload is refused several times.
	unavailable := func() (n int) {
		for _, o := range got {
			if o.err != nil && o.at.After(killed) && status.Code(o.err) == codes.Unavailable {
				n++
			}
		}
		return n
	}
	collect(func() bool { return unavailable() >= 20 }, 30*time.Second)
	restarted := time.Now()
	pg.restart()
	collect(func() bool { return successes(restarted) >= 20 }, 40*time.Second)
	close(stop)
	wg.Wait()
	close(out)
	for o := range out {
		got = append(got, o)
	}

	// While down: refused, Unavailable, nothing else. The kill instant
	// does not say which commits it caught: a batch PostgreSQL committed
	// just before it may answer its callers after another caller's
	// refusal. The CA commits one batch after another, so a request sent
	// after the first refusal came back is in a batch that began after
	// a commit failed: until the restart, it must be refused too. (What
	// was received before that is in the journal: checkJournal.)
	var firstRefusal time.Time
	for _, o := range got {
		if o.err != nil && o.at.After(killed) && (firstRefusal.IsZero() || o.at.Before(firstRefusal)) {
			firstRefusal = o.at
		}
	}
	var down, after int
	for _, o := range got {
		if o.at.Before(killed) {
			if o.err != nil {
				t.Errorf("before the fault a renewal failed: %v", o.err)
			}
			continue
		}
		if o.err != nil {
			if status.Code(o.err) != codes.Unavailable {
				t.Errorf("with PostgreSQL killed a renewal failed with %v; want Unavailable", o.err)
			}
			continue
		}
		if !firstRefusal.IsZero() && o.sent.After(firstRefusal) && o.at.Before(restarted) {
			down++
			t.Errorf("certificate %s was sent for %s after the first refusal and received %s before PostgreSQL was restarted",
				o.cert.serial, o.sent.Sub(firstRefusal).Round(time.Microsecond), restarted.Sub(o.at).Round(time.Microsecond))
		}
		if o.at.After(restarted) {
			after++
		}
	}
	if down != 0 {
		t.Errorf("%d certificates were issued while PostgreSQL was down", down)
	}
	if n := unavailable(); n < 20 {
		t.Fatalf("%d Unavailable refusals while PostgreSQL was down; want at least 20", n)
	}
	if after < 20 {
		t.Fatalf("%d renewals succeeded after PostgreSQL came back; want 20 without restarting trustmesh\n%s", after, p.stderr.String())
	}
	if p.cmd.ProcessState != nil {
		t.Fatal("trustmesh serve exited")
	}
	logs := p.stderr.String()
	// Whichever reached the dead database first says so: the committer
	// ("the database is unavailable") or the renewal check's journal lookup,
	// whose refusal names the journal's error.
	if !strings.Contains(logs, "journal: the database is unavailable") &&
		!strings.Contains(logs, `reason=renewal-check-failed code=Unavailable`) {
		t.Errorf("serve's log never says the journal is unavailable:\n%s", logs)
	}
	// A committer that saw the outage says when it ended.
	if strings.Contains(logs, "journal: the database is unavailable") && !strings.Contains(logs, "journal: the database takes commits again") {
		t.Errorf("serve's log never says the journal took commits again")
	}
	p.stop(t)

	checkJournal(t, pg.dsn, dataDir, shared, got)
	t.Logf("PostgreSQL killed %s after the burst began; %d Unavailable refusals; %d renewals after its restart; %d certificates received",
		killed.Sub(got[0].at).Round(time.Millisecond), unavailable(), after, successes(time.Time{}))
}

// checkJournal checks that every certificate in got is in the journal with
// the hash of what the client received, and that audit verify passes.
func checkJournal(t *testing.T, dsn, dataDir string, shared sharedCA, got []outcome) {
	t.Helper()
	if out := run(t, append([]string{"audit", "verify"}, shared.journalFlags(dataDir, dsn)...)...); !strings.Contains(out, "OK") {
		t.Fatalf("audit verify printed %q", out)
	}
	b, err := os.ReadFile(filepath.Join(dataDir, "checkpoint.pub"))
	if err != nil {
		t.Fatal(err)
	}
	key := strings.TrimSpace(string(b))
	store, err := journal.Open(context.Background(), journal.Config{DSN: dsn, VerifierKey: key})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := store.Integrity(); err != nil {
		t.Fatal(err)
	}
	for _, o := range got {
		if o.err != nil {
			continue
		}
		iss, err := store.LookupIssuance(context.Background(), o.cert.serial)
		if err != nil {
			t.Errorf("certificate %s was received but: %v", o.cert.serial, err)
			continue
		}
		if iss.CertSHA256 != o.cert.sha256 {
			t.Errorf("certificate %s: the journal records SHA-256 %s, the client received %s", o.cert.serial, iss.CertSHA256, o.cert.sha256)
		}
	}
}
