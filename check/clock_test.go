package check_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/check"
)

// TestClock: check reports, as TM-CA-005, a journal whose latest issuance
// is dated ahead of the check's clock by more than the CA's allowance (an
// error) and an issuance dated after every earlier certificate had expired
// while issuing went on (a forward jump, a warning); a steady journal is
// OK.
func TestClock(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Second)
	dir := newDataDir(t, now, 0) // serve's own certificate, an hour long, at now

	wantOnly(t, run(t, check.Config{DataDir: dir, Now: now.Add(time.Minute), Policies: t.TempDir()}), check.CodeClock, check.OK)

	behind := wantOnly(t, run(t, check.Config{DataDir: dir, Now: now.Add(-time.Hour), Policies: t.TempDir()}), check.CodeClock, check.Error)
	if !strings.Contains(behind[0].Message, "after this check's clock") {
		t.Errorf("message %q does not say the journal is ahead", behind[0].Message)
	}

	// An issuance two hours on, after the first certificate had expired.
	store, _, err := dir.OpenJournal(context.Background(), "cluster.local", admin.JournalOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	later := now.Add(2 * time.Hour)
	if _, err := store.RecordIssuance(context.Background(), journal.Issuance{Time: later, Serial: "abc1", SPIFFEID: "spiffe://cluster.local/ns/a/sa/a",
		Method: "kubernetes", Caller: "system:serviceaccount:a:a", Origin: journal.OriginKubernetes,
		NotBefore: later, NotAfter: later.Add(time.Hour), Issuer: "1"}, nil); err != nil {
		t.Fatal(err)
	}
	store.Close()
	jump := wantOnly(t, run(t, check.Config{DataDir: dir, Now: later.Add(time.Minute), Policies: t.TempDir()}), check.CodeClock, check.Warning)
	if len(jump) != 1 || jump[0].Subject != "issuance abc1" {
		t.Errorf("findings %+v, want one forward jump at issuance abc1", jump)
	}
}
