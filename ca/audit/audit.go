// Package audit reads the CA's journal for people: the issuance and refusal
// history, and the rotation report that says whether every workload and the
// CA itself rotated in time. Verification and proofs live in the journal.
package audit

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/human"
)

// Reader is the part of the journal audits read.
type Reader interface {
	Entries(ctx context.Context, from uint64, limit int) ([]journal.Entry, error)
}

// Filter narrows the history.
type Filter struct {
	Since    time.Time
	SPIFFEID string
}

// Row is one line of history.
type Row struct {
	Index    uint64    `json:"index"`
	Time     time.Time `json:"time"`
	Kind     string    `json:"kind"`
	SPIFFEID string    `json:"spiffe_id,omitempty"`
	Serial   string    `json:"serial,omitempty"`
	Caller   string    `json:"caller,omitempty"`
	Method   string    `json:"method,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	Reason   string    `json:"reason,omitempty"`
	Count    int64     `json:"count,omitempty"`
	Detail   string    `json:"detail,omitempty"`
	// Node is the node agent that obtained the certificate on the
	// workload's behalf (delegated issuance); "" for any other issuance.
	Node string `json:"node,omitempty"`
}

// Log returns the history that matches f, oldest first.
func Log(ctx context.Context, r Reader, f Filter) ([]Row, error) {
	var rows []Row
	err := each(ctx, r, func(e journal.Entry, rec any) {
		row := Row{Index: e.Index, Kind: string(e.Kind)}
		switch v := rec.(type) {
		case *journal.Issuance:
			row.Time, row.SPIFFEID, row.Serial, row.Caller, row.Method, row.NotAfter = v.Time, v.SPIFFEID, v.Serial, v.Caller, v.Method, v.NotAfter
			row.Node = v.Node
		case *journal.Refusal:
			row.Time, row.SPIFFEID, row.Caller, row.Method, row.Reason, row.Count = v.First, v.SPIFFEID, v.Caller, v.Method, v.Reason, v.Count
		case *journal.JoinTokenCreated:
			row.Time, row.SPIFFEID, row.NotAfter, row.Detail = v.Time, v.SPIFFEID, v.ExpiresAt, "token "+v.TokenID
		case *journal.Revocation:
			row.Time, row.SPIFFEID, row.Detail = v.Time, v.SPIFFEID, fmt.Sprintf("%d enrolment(s), %d token(s)", v.Enrolments, v.Tokens)
		case *journal.Rotation:
			row.Time, row.Serial, row.Detail = v.Time, v.Serial, v.Step+" "+v.Role+" "+v.Subject
		}
		if !f.Since.IsZero() && row.Time.Before(f.Since) {
			return
		}
		if f.SPIFFEID != "" && row.SPIFFEID != f.SPIFFEID {
			return
		}
		rows = append(rows, row)
	})
	return rows, err
}

func each(ctx context.Context, r Reader, fn func(journal.Entry, any)) error {
	return eachFrom(ctx, r, 0, fn)
}

// eachFrom decodes the entries from index next on.
func eachFrom(ctx context.Context, r Reader, next uint64, fn func(journal.Entry, any)) error {
	for {
		page, err := r.Entries(ctx, next, 5000)
		if err != nil {
			return err
		}
		if len(page) == 0 {
			return nil
		}
		for _, e := range page {
			rec, err := e.Decode()
			if err != nil {
				return err
			}
			fn(e, rec)
			next = e.Index + 1
		}
	}
}

// Level orders findings.
type Level int

const (
	Info Level = iota
	Warning
	Critical
)

func (l Level) String() string {
	return [...]string{"info", "warning", "critical"}[l]
}

// ParseLevel reads "info", "warning" or "critical".
func ParseLevel(s string) (Level, error) {
	for l := Info; l <= Critical; l++ {
		if l.String() == s {
			return l, nil
		}
	}
	return 0, fmt.Errorf("audit: level %q is not info, warning or critical", s)
}

func (l Level) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// Finding is one thing the rotation report calls out.
type Finding struct {
	Level   Level  `json:"level"`
	Kind    string `json:"kind"`
	Subject string `json:"subject"`
	Detail  string `json:"detail"`
}

// Identity is one workload identity's rotation record.
type Identity struct {
	SPIFFEID string `json:"spiffe_id"`
	// Node is the node agent that holds this identity by delegated
	// issuance. Each node's certificates for an identity are a chain of
	// renewals of their own, apart from other nodes' and from a per-pod
	// agent's, so that one node that stopped renewing is not hidden by
	// another that renews.
	Node string `json:"node,omitempty"`
	// Serial is the current (last issued) certificate's serial.
	Serial        string    `json:"serial"`
	LastIssued    time.Time `json:"last_issued"`
	Expires       time.Time `json:"expires"`
	Renewals      int       `json:"renewals"`
	LateRenewals  int       `json:"late_renewals"`
	Lapses        int       `json:"lapses"`
	Status        string    `json:"status"` // ok, due, overdue, expired, revoked
	RenewedInTime bool      `json:"renewed_in_time"`
	// LastRenewal is how the latest renewal went: on-time, late (past 75%
	// of the previous certificate's life) or lapsed (after it had
	// expired); "" before the first renewal.
	LastRenewal string `json:"last_renewal"`
}

// How a renewal went (Identity.LastRenewal).
const (
	RenewalOnTime = "on-time"
	RenewalLate   = "late"
	RenewalLapsed = "lapsed"
)

// CACert is a CA certificate in force.
type CACert struct {
	Role     string    `json:"role"`
	Subject  string    `json:"subject"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	// State is "active", "prepared", "retiring" or "trusted".
	State string `json:"state"`
}

// RotationReport answers: did everything rotate in time?
type RotationReport struct {
	At         time.Time  `json:"at"`
	Horizon    string     `json:"horizon"`
	Identities []Identity `json:"identities"`
	Expiring   []Identity `json:"expiring"`
	CA         []CACert   `json:"ca"`
	// Nodes is which node holds which identities: the certificates
	// valid at At that node agents obtained by delegated issuance,
	// grouped by node, nodes and identities sorted.
	Nodes    []NodeHolding `json:"nodes"`
	Findings []Finding     `json:"findings"`
}

// NodeHolding is what one node agent holds: its latest certificate for
// each identity, where that certificate is valid at the report's time.
type NodeHolding struct {
	Node       string         `json:"node"`
	Identities []HeldIdentity `json:"identities"`
}

// HeldIdentity is one certificate a node holds for a workload.
type HeldIdentity struct {
	SPIFFEID  string    `json:"spiffe_id"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// Revoked is set when the identity was revoked after this
	// certificate was issued: it is still valid until NotAfter, but no
	// enrolment of the identity may renew.
	Revoked bool `json:"revoked,omitempty"`
}

// Worst is the highest level among the findings, or -1 when there are none.
func (r *RotationReport) Worst() Level {
	worst := Level(-1)
	for _, f := range r.Findings {
		if f.Level > worst {
			worst = f.Level
		}
	}
	return worst
}

// Renewal windows, as fractions of a certificate's lifetime. Agents renew at
// half-life with ±10% jitter; past 75% a renewal is overdue.
const (
	dueAt     = 0.6
	overdueAt = 0.75
)

// Rotation builds the rotation report at time at: each identity's last
// issuance and expiry and whether it renewed in its window, certificates
// expiring within horizon, identities that stopped renewing, and the CA
// certificates' expiry and rotation state.
func Rotation(ctx context.Context, r Reader, ca []CACert, at time.Time, horizon time.Duration) (*RotationReport, error) {
	s := &Scanner{Until: at}
	if err := s.Update(ctx, r); err != nil {
		return nil, err
	}
	return s.Report(ca, at, horizon), nil
}

// Nodes returns which node holds which identities at time at: the
// certificates valid then that node agents obtained by delegated
// issuance, grouped by node. It is the rotation report's Nodes alone.
func Nodes(ctx context.Context, r Reader, at time.Time) ([]NodeHolding, error) {
	s := &Scanner{Until: at}
	if err := s.Update(ctx, r); err != nil {
		return nil, err
	}
	return s.Report(nil, at, 0).Nodes, nil
}

// Scanner reads the journal for the rotation report incrementally: Update
// reads only the entries appended since the last Update, so that a
// long-running reader (the web UI) does not decode the whole journal again
// whenever it grows. A Scanner is not safe for concurrent use.
type Scanner struct {
	// Until, when set, ignores issuances and revocations after it (the
	// report "as of" a past time).
	Until time.Time

	next      uint64
	ids       map[scanKey]*scanState
	revoked   map[string]time.Time
	rotations []journal.Rotation
	signed    map[string]time.Time
	// clock is what the journal's issuance times say of the CA's clock
	// (clockFindings).
	clock clockScan
}

// clockScan follows the journal's issuance times. A forward jump is called
// where an issuance is dated after every certificate issued before it had
// expired, while issuing went on: in a mesh whose agents renew at
// half-life, that is either a CA that answered no one for a whole
// certificate life, or a clock that jumped forward. (A clock stepped back
// is refused by the CA itself, ca/clock.go; journal order is not time order
// across replicas, so it is not called here.) An issuance that outlives its
// issuing certificate, where the report knows that certificate, is
// reported too (outside).
type clockScan struct {
	latest    time.Time // the latest issuance time read
	liveUntil time.Time // the latest NotAfter of the issuances read
	findings  []Finding
	// issued is every issuance's validity and issuer, for outside.
	issued []issuedSpan
}

type issuedSpan struct {
	serial, issuer      string
	notBefore, notAfter time.Time
}

func (c *clockScan) add(v *journal.Issuance) {
	switch {
	case c.latest.IsZero():
	case !c.liveUntil.IsZero() && v.Time.After(c.liveUntil):
		c.findings = append(c.findings, Finding{Level: Warning, Kind: "clock-jump-forward", Subject: "issuance " + v.Serial,
			Detail: fmt.Sprintf("dated %s, %s after the issuance before it (%s) and after every certificate issued before it had expired (%s): the CA answered no one for that long, or its clock jumped forward",
				v.Time.UTC().Format(time.RFC3339), human.Duration(v.Time.Sub(c.latest)), c.latest.UTC().Format(time.RFC3339), c.liveUntil.UTC().Format(time.RFC3339))})
	}
	if v.Time.After(c.latest) {
		c.latest = v.Time
	}
	if v.NotAfter.After(c.liveUntil) {
		c.liveUntil = v.NotAfter
	}
	c.issued = append(c.issued, issuedSpan{v.Serial, v.Issuer, v.NotBefore, v.NotAfter})
}

// outside returns a finding for each issuance read that ends after the
// CA certificate in ca with its issuer's serial.
func (c *clockScan) outside(ca []CACert) []Finding {
	ends := map[string]time.Time{}
	for _, cc := range ca {
		ends[cc.Serial] = cc.NotAfter
	}
	if len(ends) == 0 {
		return nil
	}
	var out []Finding
	for _, i := range c.issued {
		if end, ok := ends[i.issuer]; ok && i.notAfter.After(end) {
			out = append(out, Finding{Level: Critical, Kind: "outlives-issuer", Subject: "issuance " + i.serial,
				Detail: fmt.Sprintf("valid until %s, after its issuer %s ends at %s", i.notAfter.UTC().Format(time.RFC3339), i.issuer, end.UTC().Format(time.RFC3339))})
		}
	}
	return out
}

type scanState struct {
	id   Identity
	last *journal.Issuance
}

// scanKey is an identity's chain of renewals: its SPIFFE ID, and the node
// that holds it when the chain is a node agent's.
type scanKey struct{ id, node string }

// Size is how many journal entries the scanner has read.
func (s *Scanner) Size() uint64 { return s.next }

// Rotations returns the CA rotation steps read so far, oldest first. The
// caller must not modify them.
func (s *Scanner) Rotations() []journal.Rotation { return s.rotations }

// SignedUntil is when the last certificate that the CA certificate with
// serial issuer signed expires (workloads' and the CA's own), zero when it
// signed none.
func (s *Scanner) SignedUntil(issuer string) time.Time { return s.signed[issuer] }

// Issuers are the serials of the CA certificates that signed a
// certificate the scanner read, sorted.
func (s *Scanner) Issuers() []string {
	out := make([]string, 0, len(s.signed))
	for k := range s.signed {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Update reads the entries appended since the last Update.
func (s *Scanner) Update(ctx context.Context, r Reader) error {
	if s.ids == nil {
		s.ids = map[scanKey]*scanState{}
		s.revoked = map[string]time.Time{}
		s.signed = map[string]time.Time{}
	}
	after := func(t time.Time) bool { return !s.Until.IsZero() && t.After(s.Until) }
	return eachFrom(ctx, r, s.next, func(e journal.Entry, rec any) {
		s.next = e.Index + 1
		switch v := rec.(type) {
		case *journal.Rotation:
			s.rotations = append(s.rotations, *v)
		case *journal.Issuance:
			if after(v.Time) {
				return
			}
			if v.NotAfter.After(s.signed[v.Issuer]) {
				s.signed[v.Issuer] = v.NotAfter
			}
			s.clock.add(v)
			if v.Origin == journal.OriginCA {
				return
			}
			k := scanKey{v.SPIFFEID, v.Node}
			st := s.ids[k]
			if st == nil {
				st = &scanState{id: Identity{SPIFFEID: v.SPIFFEID, Node: v.Node, RenewedInTime: true}}
				s.ids[k] = st
			} else if prev := st.last; prev != nil {
				st.id.Renewals++
				life := prev.NotAfter.Sub(prev.NotBefore)
				switch {
				case !v.Time.Before(prev.NotAfter):
					st.id.Lapses++
					st.id.RenewedInTime = false
					st.id.LastRenewal = RenewalLapsed
				case v.Time.Sub(prev.NotBefore) > time.Duration(float64(life)*overdueAt):
					st.id.LateRenewals++
					st.id.RenewedInTime = false
					st.id.LastRenewal = RenewalLate
				default:
					st.id.LastRenewal = RenewalOnTime
				}
			}
			iss := *v
			st.last = &iss
			st.id.LastIssued, st.id.Expires, st.id.Serial = v.Time, v.NotAfter, v.Serial
		case *journal.Revocation:
			if !after(v.Time) {
				s.revoked[v.SPIFFEID] = v.Time
			}
		}
	})
}

// Report evaluates what the scanner has read at time at.
func (s *Scanner) Report(ca []CACert, at time.Time, horizon time.Duration) *RotationReport {
	rep := &RotationReport{At: at.UTC(), Horizon: horizon.String(), CA: ca}
	keys := make([]scanKey, 0, len(s.ids))
	for k := range s.ids {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].id != keys[j].id {
			return keys[i].id < keys[j].id
		}
		return keys[i].node < keys[j].node
	})
	held := map[string][]HeldIdentity{}
	for _, k := range keys {
		st := s.ids[k]
		id := st.id // a copy: Report leaves the scanner's state as it is
		last := st.last
		n := k.id
		if k.node != "" {
			n += " on node " + k.node
		}
		revoked := s.revoked[k.id]
		isRevoked := !revoked.IsZero() && revoked.After(last.Time)
		if k.node != "" && !at.Before(last.NotBefore) && at.Before(last.NotAfter) {
			held[k.node] = append(held[k.node], HeldIdentity{SPIFFEID: k.id, Serial: last.Serial,
				NotBefore: last.NotBefore, NotAfter: last.NotAfter, Revoked: isRevoked})
		}
		life := last.NotAfter.Sub(last.NotBefore)
		age := at.Sub(last.NotBefore)
		switch {
		case isRevoked:
			id.Status = "revoked"
		case !at.Before(last.NotAfter):
			id.Status = "expired"
			rep.Findings = append(rep.Findings, Finding{Level: Critical, Kind: "stopped-renewing", Subject: n,
				Detail: fmt.Sprintf("last certificate expired %s with no renewal", human.When(last.NotAfter, at))})
		case age > time.Duration(float64(life)*overdueAt):
			id.Status = "overdue"
			rep.Findings = append(rep.Findings, Finding{Level: Warning, Kind: "renewal-overdue", Subject: n,
				Detail: fmt.Sprintf("certificate is %.0f%% through its life and was not renewed; it expires %s", 100*float64(age)/float64(life), human.When(last.NotAfter, at))})
		case age > time.Duration(float64(life)*dueAt):
			id.Status = "due"
		default:
			id.Status = "ok"
		}
		if id.Lapses > 0 {
			rep.Findings = append(rep.Findings, Finding{Level: Warning, Kind: "coverage-lapse", Subject: n,
				Detail: fmt.Sprintf("%d renewal(s) came after the previous certificate had expired", id.Lapses)})
		}
		rep.Identities = append(rep.Identities, id)
		if id.Status != "revoked" && id.Status != "expired" && last.NotAfter.Before(at.Add(horizon)) {
			rep.Expiring = append(rep.Expiring, id)
		}
	}
	nodes := make([]string, 0, len(held))
	for n := range held {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	for _, n := range nodes {
		rep.Nodes = append(rep.Nodes, NodeHolding{Node: n, Identities: held[n]})
	}
	rep.Findings = append(rep.Findings, s.clock.findings...)
	rep.Findings = append(rep.Findings, s.clock.outside(ca)...)
	for _, c := range ca {
		left := c.NotAfter.Sub(at)
		switch {
		case c.State == "retiring" || c.State == "prepared":
		case left <= 0:
			rep.Findings = append(rep.Findings, Finding{Level: Critical, Kind: "ca-expired", Subject: c.Role + " " + c.Subject,
				Detail: "expired " + human.When(c.NotAfter, at)})
		case left < horizon:
			rep.Findings = append(rep.Findings, Finding{Level: Critical, Kind: "ca-expiring", Subject: c.Role + " " + c.Subject,
				Detail: fmt.Sprintf("expires %s, within the %s horizon", human.When(c.NotAfter, at), human.Duration(horizon))})
		}
	}
	return rep
}

// Rotations returns the CA rotation steps the journal records (prepare,
// activate, retire of roots and intermediates), oldest first.
func Rotations(ctx context.Context, r Reader) ([]journal.Rotation, error) {
	var out []journal.Rotation
	err := each(ctx, r, func(_ journal.Entry, rec any) {
		if v, ok := rec.(*journal.Rotation); ok {
			out = append(out, *v)
		}
	})
	return out, err
}
