package audit_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// countingReader counts the entries the scanner reads.
type countingReader struct {
	r    audit.Reader
	read int
}

func (c *countingReader) Entries(ctx context.Context, from uint64, limit int) ([]journal.Entry, error) {
	es, err := c.r.Entries(ctx, from, limit)
	c.read += len(es)
	return es, err
}

// TestScannerReadsOnlyNewEntries: a Scanner updated after the journal grew
// reads only the new entries, and reports what a full Rotation reports.
func TestScannerReadsOnlyNewEntries(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	id := "spiffe://cluster.local/ns/default/sa/renewer"
	issue(t, s, id, at.Add(-3*time.Hour), time.Hour, journal.OriginJoinToken)
	issue(t, s, id, at.Add(-100*time.Minute), time.Hour, journal.OriginJoinToken) // a lapse
	cr := &countingReader{r: s}
	var sc audit.Scanner
	if err := sc.Update(ctx, cr); err != nil {
		t.Fatal(err)
	}
	if cr.read != 2 || sc.Size() != 2 {
		t.Fatalf("first update read %d entries, size %d; want 2, 2", cr.read, sc.Size())
	}
	issue(t, s, id, at.Add(-70*time.Minute), time.Hour, journal.OriginJoinToken) // 50%: on time
	if err := sc.Update(ctx, cr); err != nil {
		t.Fatal(err)
	}
	if cr.read != 3 {
		t.Fatalf("after one more entry the scanner read %d entries in all, want 3", cr.read)
	}
	full, err := audit.Rotation(ctx, s, nil, at, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, want := dump(sc.Report(nil, at, 0)), dump(full)
	if got != want {
		t.Errorf("incremental report\n%s\nwant\n%s", got, want)
	}
	// The report is evaluated on a copy: evaluating it again at another
	// time changes nothing that was read.
	sc.Report(nil, at.Add(10*time.Hour), 0)
	if got := dump(sc.Report(nil, at, 0)); got != want {
		t.Errorf("a report at another time changed the scanner's state:\n%s", got)
	}
}

// TestLastRenewal: the latest renewal's timeliness is reported apart from
// the lifetime counts, so that one old lapse does not mark an identity
// forever.
func TestLastRenewal(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	id := func(n string) string { return "spiffe://cluster.local/ns/default/sa/" + n }
	issue(t, s, id("once"), at.Add(-10*time.Minute), time.Hour, journal.OriginKubernetes)
	// recovered: a lapse, then an on-time renewal.
	issue(t, s, id("recovered"), at.Add(-4*time.Hour), time.Hour, journal.OriginKubernetes)
	issue(t, s, id("recovered"), at.Add(-2*time.Hour), time.Hour, journal.OriginKubernetes)
	issue(t, s, id("recovered"), at.Add(-90*time.Minute), time.Hour, journal.OriginKubernetes)
	// late: on time, then late.
	issue(t, s, id("late"), at.Add(-2*time.Hour), time.Hour, journal.OriginKubernetes)
	issue(t, s, id("late"), at.Add(-90*time.Minute), time.Hour, journal.OriginKubernetes)
	issue(t, s, id("late"), at.Add(-40*time.Minute), time.Hour, journal.OriginKubernetes)
	rep, err := audit.Rotation(ctx, s, nil, at, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, i := range rep.Identities {
		got[i.SPIFFEID] = i.LastRenewal
	}
	want := map[string]string{id("once"): "", id("recovered"): audit.RenewalOnTime, id("late"): audit.RenewalLate}
	if b, _ := json.Marshal(got); string(b) != func() string { b, _ := json.Marshal(want); return string(b) }() {
		t.Errorf("last renewals %s, want %s", got, want)
	}
}

// TestSignedUntil: the scanner knows when the last certificate each CA
// certificate signed expires.
func TestSignedUntil(t *testing.T) {
	s := openJournal(t)
	issue(t, s, "spiffe://cluster.local/ns/a/sa/x", at.Add(-time.Hour), 2*time.Hour, journal.OriginKubernetes)
	issue(t, s, "spiffe://cluster.local/ns/a/sa/y", at.Add(-2*time.Hour), 2*time.Hour, journal.OriginCA)
	var sc audit.Scanner
	if err := sc.Update(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if got := sc.SignedUntil("1"); !got.Equal(at.Add(time.Hour)) {
		t.Errorf("SignedUntil(1) = %v, want %v", got, at.Add(time.Hour))
	}
	if got := sc.Issuers(); len(got) != 1 || got[0] != "1" {
		t.Errorf("Issuers() = %q, want [1]", got)
	}
	if got := sc.SignedUntil("2"); !got.IsZero() {
		t.Errorf("SignedUntil of an issuer that signed nothing = %v", got)
	}
}
