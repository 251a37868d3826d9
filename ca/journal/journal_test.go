package journal_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/journal"
)

var t0 = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

func issuance(serial, id string) journal.Issuance {
	return journal.Issuance{Time: t0, Serial: serial, SPIFFEID: id, Method: "join-token", Origin: journal.OriginJoinToken,
		NotBefore: t0, NotAfter: t0.Add(time.Hour)}
}

// A join token is redeemed by exactly one issuance, even when many race for
// it, and a failed redemption writes nothing.
func TestRedeemOnce(t *testing.T) { eachBackend(t, testRedeemOnce) }

func testRedeemOnce(t *testing.T, b backend) {
	s := b.open(t)
	ctx := context.Background()
	const id = "spiffe://cluster.local/vm/a"
	hash := []byte("0123456789abcdef0123456789abcdef")
	if err := s.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "tok1", SPIFFEID: id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, spent := 0, 0
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			iss := issuance(string(rune('a'+i)), id)
			iss.EnrolmentID = "tok1"
			_, err := s.RecordIssuance(ctx, iss, &journal.Redemption{TokenHash: hash, TokenID: "tok1"})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, journal.ErrTokenSpent):
				spent++
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok != 1 || spent != 7 {
		t.Fatalf("%d redemptions succeeded and %d were refused; want 1 and 7", ok, spent)
	}
	entries, err := s.Entries(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 { // the token's creation and one issuance
		t.Fatalf("journal holds %d entries, want 2", len(entries))
	}
	tok, err := s.LookupJoinToken(ctx, hash)
	if err != nil || tok.UsedAt.IsZero() {
		t.Fatalf("token after redemption = %+v, %v; want used", tok, err)
	}
	if e, err := s.LookupEnrolment(ctx, "tok1"); err != nil || e.SPIFFEID != id {
		t.Fatalf("enrolment = %+v, %v", e, err)
	}
}

func TestRedeemRefusesExpiredOrOtherIdentity(t *testing.T) {
	eachBackend(t, testRedeemRefusesExpiredOrOtherIdentity)
}

func testRedeemRefusesExpiredOrOtherIdentity(t *testing.T, b backend) {
	s := b.open(t)
	ctx := context.Background()
	hash := []byte("h")
	if err := s.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "t", SPIFFEID: "spiffe://cluster.local/a", CreatedAt: t0, ExpiresAt: t0.Add(time.Minute)}); err != nil {
		t.Fatal(err)
	}
	other := issuance("1", "spiffe://cluster.local/b")
	other.EnrolmentID = "t"
	if _, err := s.RecordIssuance(ctx, other, &journal.Redemption{TokenHash: hash, TokenID: "t"}); !errors.Is(err, journal.ErrTokenSpent) {
		t.Fatalf("redeeming for another identity: %v, want ErrTokenSpent", err)
	}
	late := issuance("2", "spiffe://cluster.local/a")
	late.EnrolmentID = "t"
	late.Time = t0.Add(time.Minute)
	if _, err := s.RecordIssuance(ctx, late, &journal.Redemption{TokenHash: hash, TokenID: "t"}); !errors.Is(err, journal.ErrTokenSpent) {
		t.Fatalf("redeeming an expired token: %v, want ErrTokenSpent", err)
	}
	if _, err := s.LookupIssuance(ctx, "2"); !errors.Is(err, journal.ErrNotFound) {
		t.Fatalf("a refused redemption left an issuance: %v", err)
	}
}

func TestEntriesDecodeToWhatWasRecorded(t *testing.T) {
	eachBackend(t, testEntriesDecodeToWhatWasRecorded)
}

func testEntriesDecodeToWhatWasRecorded(t *testing.T, b backend) {
	s := b.open(t)
	ctx := context.Background()
	want := issuance("abc", "spiffe://cluster.local/x")
	want.CertSHA256 = "00ff"
	if _, err := s.RecordIssuance(ctx, want, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(ctx, "spiffe://cluster.local/x", t0); err != nil {
		t.Fatal(err)
	}
	entries, err := s.Entries(ctx, 0, 10)
	if err != nil || len(entries) != 2 {
		t.Fatalf("entries = %v, %v", entries, err)
	}
	got, err := entries[0].Decode()
	if err != nil {
		t.Fatal(err)
	}
	if iss := got.(*journal.Issuance); *iss != want {
		t.Fatalf("decoded %+v, want %+v", *iss, want)
	}
	if rev, err := entries[1].Decode(); err != nil || rev.(*journal.Revocation).SPIFFEID != want.SPIFFEID {
		t.Fatalf("decoded %v, %v", rev, err)
	}
}

type appender struct {
	mu    sync.Mutex
	got   [][]journal.Refusal
	fail  bool
	calls int
}

func (a *appender) AppendRefusals(_ context.Context, r []journal.Refusal) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls++
	if a.fail {
		return errors.New("disk full")
	}
	a.got = append(a.got, r)
	return nil
}

// A flood of refusals becomes one record per distinct group, bounded in
// memory, and a failed write loses nothing.
func TestRefusalLogAggregatesAndBounds(t *testing.T) {
	a := &appender{fail: true}
	l := journal.NewRefusalLog(journal.RefusalLogConfig{Appender: a, MaxKeys: 2, Clock: clocktesting.NewFakeClock(t0)})
	for i := range 1000 {
		l.Record(t0.Add(time.Duration(i)*time.Millisecond), "token-rejected", "kubernetes", "", "")
	}
	l.Record(t0, "cert-invalid", "x509-renewal", "x509:1", "")
	l.Record(t0, "join-token-used", "join-token", "", "spiffe://cluster.local/a") // over MaxKeys
	if err := l.Flush(context.Background()); err == nil {
		t.Fatal("Flush() with a failing appender succeeded")
	}
	a.fail = false
	l.Record(t0.Add(time.Hour), "token-rejected", "kubernetes", "", "")
	if err := l.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(a.got) != 1 {
		t.Fatalf("%d batches written, want 1", len(a.got))
	}
	counts := map[string]int64{}
	for _, r := range a.got[0] {
		counts[r.Reason] += r.Count
	}
	want := map[string]int64{"token-rejected": 1001, "cert-invalid": 1, journal.OverflowReason: 1}
	for k, v := range want {
		if counts[k] != v {
			t.Errorf("count[%s] = %d, want %d (all: %v)", k, counts[k], v, counts)
		}
	}
	if len(a.got[0]) != 3 {
		t.Errorf("wrote %d records, want 3", len(a.got[0]))
	}
}

// Run writes on its ticker, driven by the fake clock, and flushes at the end.
func TestRefusalLogRun(t *testing.T) {
	a := &appender{}
	clk := clocktesting.NewFakeClock(t0)
	l := journal.NewRefusalLog(journal.RefusalLogConfig{Appender: a, Clock: clk, Interval: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- l.Run(ctx) }()
	for !clk.HasWaiters() {
		time.Sleep(time.Millisecond) // wait for the ticker to exist, not for time to pass
	}
	l.Record(t0, "r1", "m", "", "")
	clk.Step(time.Second)
	waitFor(t, func() bool { a.mu.Lock(); defer a.mu.Unlock(); return len(a.got) == 1 })
	l.Record(t0, "r2", "m", "", "")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(a.got) != 2 || a.got[1][0].Reason != "r2" {
		t.Fatalf("batches = %+v; want r1 on the tick and r2 at shutdown", a.got)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met")
		}
		time.Sleep(time.Millisecond)
	}
}

// A lone caller never waits for company: with an hour's commit delay,
// sequential appends still return at once. Concurrent appends share
// commits, each still covered by a signed checkpoint.
func TestCommitDelayOnlyUnderConcurrency(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn, Signer: testSigner, VerifierKey: testVKey,
			CommitDelay: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		lone := make(chan error, 1)
		go func() {
			for i := range 10 {
				if _, err := s.RecordIssuance(ctx, issuance(fmt.Sprintf("lone-%d", i), "spiffe://cluster.local/x"), nil); err != nil {
					lone <- fmt.Errorf("append %d: %w", i, err)
					return
				}
			}
			lone <- nil
		}()
		select {
		case err := <-lone:
			if err != nil {
				t.Fatal(err)
			}
		case <-ctx.Done():
			t.Fatal("a lone caller's appends waited for company")
		}
		if cps, err := s.Checkpoints(ctx); err != nil || len(cps) != 10 {
			t.Fatalf("%d checkpoints (%v), want one per sequential append", len(cps), err)
		}

		c := b.open(t) // the default delay
		var wg sync.WaitGroup
		const n = 128
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := c.RecordIssuance(ctx, issuance(fmt.Sprintf("many-%d", i), "spiffe://cluster.local/y"), nil); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		cps, err := c.Checkpoints(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(cps) - 10; got >= n {
			t.Fatalf("%d commits for %d concurrent appends, want them grouped", got, n)
		}
		if rep := verify(t, b); !rep.OK() || rep.Entries != 10+n {
			t.Fatalf("entries %d, findings %+v; want %d and none", rep.Entries, rep.Findings, 10+n)
		}
	})
}

// A commit writes its rows in multi-row statements of 64, 32, … 1 rows: 101
// entries in one append take four of them, and every row lands at its index
// under the checkpoint signed over them.
func TestManyEntriesInOneCommit(t *testing.T) { eachBackend(t, testManyEntriesInOneCommit) }

func testManyEntriesInOneCommit(t *testing.T, b backend) {
	s := b.open(t)
	ctx := context.Background()
	const n = 101
	refusals := make([]journal.Refusal, n)
	for i := range refusals {
		refusals[i] = journal.Refusal{First: t0, Last: t0, Reason: fmt.Sprint("reason-", i), Count: 1}
	}
	if err := s.AppendRefusals(ctx, refusals); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RecordIssuance(ctx, issuance("after", "spiffe://cluster.local/x"), nil); err != nil {
		t.Fatal(err)
	}
	entries, err := s.Entries(ctx, 0, 2*n)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != n+1 {
		t.Fatalf("%d entries stored, want %d", len(entries), n+1)
	}
	for i, e := range entries[:n] {
		got, err := e.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if r, ok := got.(*journal.Refusal); e.Index != uint64(i) || !ok || r.Reason != refusals[i].Reason {
			t.Fatalf("entry %d at index %d holds %+v, want %+v", i, e.Index, got, refusals[i])
		}
	}
	rep, err := journal.Verify(ctx, s, testVKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("verify: %+v", rep.Findings)
	}
}
