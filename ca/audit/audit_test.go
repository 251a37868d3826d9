package audit_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// at is the fixed time every test reads the journal at.
var at = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

const (
	alice = "spiffe://cluster.local/ns/default/sa/alice"
	bob   = "spiffe://cluster.local/ns/default/sa/bob"
)

func openJournal(t *testing.T) *journal.Store {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(context.Background(), journal.Config{DSN: filepath.Join(t.TempDir(), "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store
}

var serials int

// issue records a certificate for id issued at from, living for life.
func issue(t *testing.T, s *journal.Store, id string, from time.Time, life time.Duration, origin journal.Origin) string {
	t.Helper()
	serials++
	serial := fmt.Sprintf("%x", serials)
	if _, err := s.RecordIssuance(context.Background(), journal.Issuance{
		Time: from, Serial: serial, SPIFFEID: id, Method: "kubernetes", Caller: "system:serviceaccount:" + id,
		Origin: origin, NotBefore: from, NotAfter: from.Add(life), Issuer: "1",
	}, nil); err != nil {
		t.Fatal(err)
	}
	return serial
}

// TestLog: every kind of record becomes a row with its fields, and the
// filter selects by time and by identity.
func TestLog(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	aliceSerial := issue(t, s, alice, at.Add(-time.Hour), time.Hour, journal.OriginKubernetes)
	if err := s.AppendRefusals(ctx, []journal.Refusal{{First: at.Add(-50 * time.Minute), Last: at.Add(-40 * time.Minute),
		Reason: "token-expired", Method: "kubernetes", Caller: "system:serviceaccount:default:bob", SPIFFEID: bob, Count: 3}}); err != nil {
		t.Fatal(err)
	}
	hash := sha256.Sum256([]byte("token"))
	if err := s.CreateJoinToken(ctx, hash[:], journal.JoinToken{ID: "0011", SPIFFEID: bob, CreatedAt: at.Add(-30 * time.Minute), ExpiresAt: at}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(ctx, bob, at.Add(-20*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordRotation(ctx, journal.Rotation{Time: at.Add(-10 * time.Minute), Step: "activate", Role: "intermediate",
		Serial: "abc", Subject: "trustmesh intermediate", NotAfter: at.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}

	all := []audit.Row{
		{Index: 0, Time: at.Add(-time.Hour), Kind: "issuance", SPIFFEID: alice, Serial: aliceSerial, Caller: "system:serviceaccount:" + alice, Method: "kubernetes", NotAfter: at},
		{Index: 1, Time: at.Add(-50 * time.Minute), Kind: "refusal", SPIFFEID: bob, Caller: "system:serviceaccount:default:bob", Method: "kubernetes", Reason: "token-expired", Count: 3},
		{Index: 2, Time: at.Add(-30 * time.Minute), Kind: "join-token", SPIFFEID: bob, NotAfter: at, Detail: "token 0011"},
		{Index: 3, Time: at.Add(-20 * time.Minute), Kind: "revocation", SPIFFEID: bob, Detail: "0 enrolment(s), 1 token(s)"},
		{Index: 4, Time: at.Add(-10 * time.Minute), Kind: "rotation", Serial: "abc", Detail: "activate intermediate trustmesh intermediate"},
	}
	tests := []struct {
		name string
		f    audit.Filter
		want []audit.Row
	}{
		{"everything", audit.Filter{}, all},
		{"since is inclusive", audit.Filter{Since: at.Add(-30 * time.Minute)}, all[2:]},
		{"one identity", audit.Filter{SPIFFEID: bob}, all[1:4]},
		{"both", audit.Filter{SPIFFEID: bob, Since: at.Add(-25 * time.Minute)}, all[3:4]},
		{"nothing matches", audit.Filter{SPIFFEID: alice, Since: at}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := audit.Log(ctx, s, tc.f)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("rows:\n%s\nwant:\n%s", dump(got), dump(tc.want))
			}
		})
	}
}

func dump(v any) string {
	b, _ := json.MarshalIndent(v, "", "  ")
	return string(b)
}

// pagedReader serves entries a few at a time, as a large journal does.
type pagedReader struct {
	entries []journal.Entry
	page    int
	calls   int
}

func (r *pagedReader) Entries(_ context.Context, from uint64, limit int) ([]journal.Entry, error) {
	r.calls++
	n := min(limit, r.page)
	var out []journal.Entry
	for _, e := range r.entries {
		if e.Index >= from && len(out) < n {
			out = append(out, e)
		}
	}
	return out, nil
}

// TestLogReadsEveryPage: the history does not stop at the first page.
func TestLogReadsEveryPage(t *testing.T) {
	r := &pagedReader{page: 2}
	for i := range 5 {
		body, _ := json.Marshal(map[string]any{"kind": "issuance", "record": journal.Issuance{Time: at.Add(time.Duration(i) * time.Minute), Serial: fmt.Sprint(i), SPIFFEID: alice}})
		r.entries = append(r.entries, journal.Entry{Index: uint64(i), Kind: journal.KindIssuance, Body: body})
	}
	rows, err := audit.Log(context.Background(), r, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 5 || rows[4].Serial != "4" {
		t.Fatalf("read %d rows over %d pages; want all 5", len(rows), r.calls)
	}
	// A body that does not decode fails the audit rather than skipping.
	r.entries[3].Body = []byte(`{"kind":"refusal","record":{}}`)
	if _, err := audit.Log(context.Background(), r, audit.Filter{}); err == nil {
		t.Fatal("an entry whose body names another kind was read without error")
	}
}

// TestRotationReport reads a journal at a fixed time and checks each
// identity's status and renewal record, what expires within the horizon,
// and the findings about workloads and the CA.
func TestRotationReport(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	const life = time.Hour
	ago := func(d time.Duration) time.Time { return at.Add(-d) }
	id := func(name string) string { return "spiffe://cluster.local/ns/default/sa/" + name }

	issue(t, s, id("fresh"), ago(10*time.Minute), life, journal.OriginKubernetes)   // 17% through
	issue(t, s, id("due"), ago(40*time.Minute), life, journal.OriginKubernetes)     // 67%
	issue(t, s, id("overdue"), ago(50*time.Minute), life, journal.OriginKubernetes) // 83%
	issue(t, s, id("stopped"), ago(2*time.Hour), life, journal.OriginKubernetes)    // expired an hour ago
	issue(t, s, id("revoked"), ago(2*time.Hour), life, journal.OriginKubernetes)
	if _, err := s.Revoke(ctx, id("revoked"), ago(90*time.Minute)); err != nil {
		t.Fatal(err)
	}
	// renewer: on time, then late (past 75%), then after a lapse, then on
	// time again.
	issue(t, s, id("renewer"), ago(3*time.Hour), life, journal.OriginJoinToken)                // to 2h ago
	issue(t, s, id("renewer"), ago(2*time.Hour+30*time.Minute), life, journal.OriginJoinToken) // 50%: in time, to 1h30m ago
	issue(t, s, id("renewer"), ago(100*time.Minute), life, journal.OriginJoinToken)            // 83%: late, to 40m ago
	issue(t, s, id("renewer"), ago(30*time.Minute), life, journal.OriginJoinToken)             // after expiry: a lapse
	// The CA's own serving certificates, and anything after at, are not
	// workloads' renewals.
	issue(t, s, id("trustmesh"), ago(2*time.Hour), life, journal.OriginCA)
	issue(t, s, id("fresh"), at.Add(time.Minute), life, journal.OriginKubernetes)

	caCerts := []audit.CACert{
		{Role: "root", Subject: "root A", Serial: "a", NotAfter: at.Add(365 * 24 * time.Hour), State: "trusted"},
		{Role: "intermediate", Subject: "inter B", Serial: "b", NotAfter: at.Add(20 * time.Minute), State: "active"},
		{Role: "intermediate", Subject: "inter C", Serial: "c", NotAfter: at.Add(2 * time.Hour), State: "prepared"},
		{Role: "root", Subject: "root D", Serial: "d", NotAfter: ago(time.Minute), State: "retiring"},
		{Role: "root", Subject: "root E", Serial: "e", NotAfter: ago(time.Minute), State: "trusted"},
	}
	rep, err := audit.Rotation(ctx, s, caCerts, at, 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}

	type idState struct {
		Status                         string
		Renewals, LateRenewals, Lapses int
		InTime                         bool
		Expires                        time.Time
	}
	got := map[string]idState{}
	for _, i := range rep.Identities {
		got[i.SPIFFEID] = idState{i.Status, i.Renewals, i.LateRenewals, i.Lapses, i.RenewedInTime, i.Expires}
	}
	want := map[string]idState{
		id("fresh"):   {"ok", 0, 0, 0, true, ago(10 * time.Minute).Add(life)},
		id("due"):     {"due", 0, 0, 0, true, ago(40 * time.Minute).Add(life)},
		id("overdue"): {"overdue", 0, 0, 0, true, ago(50 * time.Minute).Add(life)},
		id("stopped"): {"expired", 0, 0, 0, true, ago(time.Hour)},
		id("revoked"): {"revoked", 0, 0, 0, true, ago(time.Hour)},
		id("renewer"): {"ok", 3, 1, 1, false, at.Add(30 * time.Minute)},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("identities:\n%+v\nwant:\n%+v", got, want)
	}
	for i := 1; i < len(rep.Identities); i++ {
		if rep.Identities[i-1].SPIFFEID >= rep.Identities[i].SPIFFEID {
			t.Errorf("identities are not sorted: %s before %s", rep.Identities[i-1].SPIFFEID, rep.Identities[i].SPIFFEID)
		}
	}

	// Within the 30m horizon: due (20m left) and overdue (10m left), not
	// the expired or revoked ones, and not renewer (exactly 30m left).
	var expiring []string
	for _, i := range rep.Expiring {
		expiring = append(expiring, i.SPIFFEID)
	}
	if want := []string{id("due"), id("overdue")}; !reflect.DeepEqual(expiring, want) {
		t.Errorf("expiring %v, want %v", expiring, want)
	}

	type finding struct {
		Level         audit.Level
		Kind, Subject string
	}
	var findings []finding
	for _, f := range rep.Findings {
		findings = append(findings, finding{f.Level, f.Kind, f.Subject})
	}
	wantFindings := []finding{
		{audit.Warning, "renewal-overdue", id("overdue")},
		{audit.Warning, "coverage-lapse", id("renewer")},
		{audit.Critical, "stopped-renewing", id("stopped")},
		{audit.Critical, "ca-expiring", "intermediate inter B"},
		{audit.Critical, "ca-expired", "root root E"},
	}
	if !reflect.DeepEqual(findings, wantFindings) {
		t.Errorf("findings:\n%+v\nwant:\n%+v", findings, wantFindings)
	}
	if rep.Worst() != audit.Critical {
		t.Errorf("worst %s, want critical", rep.Worst())
	}
	if rep.At != at || rep.Horizon != "30m0s" {
		t.Errorf("report at %s horizon %s", rep.At, rep.Horizon)
	}
}

// TestRotationReportQuiet: a journal where everything renewed in time
// reports no findings, and Worst says so.
func TestRotationReportQuiet(t *testing.T) {
	s := openJournal(t)
	issue(t, s, alice, at.Add(-90*time.Minute), time.Hour, journal.OriginKubernetes)
	issue(t, s, alice, at.Add(-60*time.Minute), time.Hour, journal.OriginKubernetes)
	issue(t, s, alice, at.Add(-30*time.Minute), time.Hour, journal.OriginKubernetes)
	rep, err := audit.Rotation(context.Background(), s,
		[]audit.CACert{{Role: "intermediate", Subject: "i", NotAfter: at.Add(48 * time.Hour), State: "active"}}, at, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Findings) != 0 || rep.Worst() != -1 {
		t.Fatalf("findings %+v, worst %d; want none", rep.Findings, rep.Worst())
	}
	if len(rep.Identities) != 1 || rep.Identities[0].Renewals != 2 || !rep.Identities[0].RenewedInTime || rep.Identities[0].Status != "ok" {
		t.Fatalf("identities %+v", rep.Identities)
	}
	if len(rep.Expiring) != 1 {
		t.Fatalf("a certificate expiring in 30m is not listed within a 24h horizon: %+v", rep.Expiring)
	}
}

func TestParseLevel(t *testing.T) {
	for _, l := range []audit.Level{audit.Info, audit.Warning, audit.Critical} {
		text, err := l.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		got, err := audit.ParseLevel(string(text))
		if err != nil || got != l {
			t.Errorf("ParseLevel(%q) = %v, %v; want %v", text, got, err, l)
		}
	}
	if _, err := audit.ParseLevel("severe"); err == nil {
		t.Error("ParseLevel accepted an unknown level")
	}
}

// TestRotationReportNamesTheCurrentSerial: each identity carries the serial
// of its last certificate, not of an earlier one, nor of one after at.
func TestRotationReportNamesTheCurrentSerial(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	issue(t, s, alice, at.Add(-50*time.Minute), time.Hour, journal.OriginKubernetes)
	current := issue(t, s, alice, at.Add(-20*time.Minute), time.Hour, journal.OriginKubernetes)
	issue(t, s, alice, at.Add(time.Minute), time.Hour, journal.OriginKubernetes)
	rep, err := audit.Rotation(ctx, s, nil, at, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Identities) != 1 || rep.Identities[0].Serial != current {
		t.Fatalf("identities = %+v, want alice with serial %s", rep.Identities, current)
	}
}

// TestRotations lists the journal's CA rotation steps, oldest first, and
// nothing else.
func TestRotations(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	issue(t, s, alice, at, time.Hour, journal.OriginKubernetes)
	for i, step := range []string{"prepare", "activate"} {
		if err := s.RecordRotation(ctx, journal.Rotation{Time: at.Add(time.Duration(i) * time.Hour), Step: step, Role: "intermediate", Serial: "0a", Subject: "inter"}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := audit.Rotations(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Step != "prepare" || got[1].Step != "activate" || got[1].Subject != "inter" {
		t.Fatalf("Rotations = %+v", got)
	}
}

// issueFor records a certificate that node obtained for id by delegated
// issuance, issued at from and living for life.
func issueFor(t *testing.T, s *journal.Store, node, id string, from time.Time, life time.Duration) string {
	t.Helper()
	serials++
	serial := fmt.Sprintf("%x", serials)
	if _, err := s.RecordIssuance(context.Background(), journal.Issuance{
		Time: from, Serial: serial, SPIFFEID: id, Method: "node-delegated", Caller: "x509:ab",
		Origin: journal.OriginNode, Node: node, NotBefore: from, NotAfter: from.Add(life), Issuer: "1",
	}, nil); err != nil {
		t.Fatal(err)
	}
	return serial
}

// TestRotationReportNodes: the report says which node holds which
// identities (each node's latest certificate for each identity, valid at
// the report's time), and each node's certificates for an identity are a
// renewal chain of their own, apart from another node's and from a per-pod
// agent's certificates for the same identity.
func TestRotationReportNodes(t *testing.T) {
	ctx := context.Background()
	s := openJournal(t)
	const life = time.Hour
	ago := func(d time.Duration) time.Time { return at.Add(-d) }
	id := func(name string) string { return "spiffe://cluster.local/ns/default/sa/" + name }

	// node-a renews web on time; node-b and a per-pod agent get web in
	// between, which are not node-a's renewals.
	issueFor(t, s, "node-a", id("web"), ago(50*time.Minute), life)
	issueFor(t, s, "node-b", id("web"), ago(45*time.Minute), life)
	issue(t, s, id("web"), ago(40*time.Minute), life, journal.OriginKubernetes)
	aWeb := issueFor(t, s, "node-a", id("web"), ago(20*time.Minute), life)
	bWeb := issueFor(t, s, "node-b", id("web"), ago(15*time.Minute), life)
	aDB := issueFor(t, s, "node-a", id("db"), ago(10*time.Minute), life)
	// node-b held gone, which has expired: not held any more, and it
	// stopped renewing.
	issueFor(t, s, "node-b", id("gone"), ago(2*time.Hour), life)
	// node-a holds rev, revoked since: still valid, marked.
	aRev := issueFor(t, s, "node-a", id("rev"), ago(30*time.Minute), life)
	if _, err := s.Revoke(ctx, id("rev"), ago(5*time.Minute)); err != nil {
		t.Fatal(err)
	}
	// After at: not yet issued as of at.
	issueFor(t, s, "node-c", id("web"), at.Add(time.Minute), life)

	rep, err := audit.Rotation(ctx, s, nil, at, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	wantNodes := []audit.NodeHolding{
		{Node: "node-a", Identities: []audit.HeldIdentity{
			{SPIFFEID: id("db"), Serial: aDB, NotBefore: ago(10 * time.Minute), NotAfter: ago(10 * time.Minute).Add(life)},
			{SPIFFEID: id("rev"), Serial: aRev, NotBefore: ago(30 * time.Minute), NotAfter: ago(30 * time.Minute).Add(life), Revoked: true},
			{SPIFFEID: id("web"), Serial: aWeb, NotBefore: ago(20 * time.Minute), NotAfter: ago(20 * time.Minute).Add(life)},
		}},
		{Node: "node-b", Identities: []audit.HeldIdentity{
			{SPIFFEID: id("web"), Serial: bWeb, NotBefore: ago(15 * time.Minute), NotAfter: ago(15 * time.Minute).Add(life)},
		}},
	}
	if !reflect.DeepEqual(rep.Nodes, wantNodes) {
		t.Errorf("nodes:\n%s\nwant:\n%s", dump(rep.Nodes), dump(wantNodes))
	}
	nodes, err := audit.Nodes(ctx, s, at)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(nodes, wantNodes) {
		t.Errorf("audit.Nodes:\n%s\nwant the report's:\n%s", dump(nodes), dump(wantNodes))
	}

	type chain struct {
		SPIFFEID, Node, Status string
		Renewals, Late, Lapses int
	}
	var got []chain
	for _, i := range rep.Identities {
		got = append(got, chain{i.SPIFFEID, i.Node, i.Status, i.Renewals, i.LateRenewals, i.Lapses})
	}
	want := []chain{
		{id("db"), "node-a", "ok", 0, 0, 0},
		{id("gone"), "node-b", "expired", 0, 0, 0},
		{id("rev"), "node-a", "revoked", 0, 0, 0},
		{id("web"), "", "due", 0, 0, 0},
		{id("web"), "node-a", "ok", 1, 0, 0},
		{id("web"), "node-b", "ok", 1, 0, 0},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("identities:\n%+v\nwant:\n%+v", got, want)
	}
	var stopped []string
	for _, f := range rep.Findings {
		stopped = append(stopped, f.Kind+" "+f.Subject)
	}
	if w := []string{"stopped-renewing " + id("gone") + " on node node-b"}; !reflect.DeepEqual(stopped, w) {
		t.Errorf("findings %q, want %q", stopped, w)
	}

	// The history names the node of a delegated issuance, and no node
	// for any other.
	rows, err := audit.Log(ctx, s, audit.Filter{SPIFFEID: id("web")})
	if err != nil {
		t.Fatal(err)
	}
	var rowNodes []string
	for _, r := range rows {
		rowNodes = append(rowNodes, r.Node)
	}
	if w := []string{"node-a", "node-b", "", "node-a", "node-b", "node-c"}; !reflect.DeepEqual(rowNodes, w) {
		t.Errorf("log rows' nodes %q, want %q", rowNodes, w)
	}
}
