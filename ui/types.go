package ui

import (
	"context"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/internal/human"
)

// The data the page shows comes through these interfaces; the control
// plane adapts its components to them (controlplane/ui.go). A nil source
// answers its view as empty, saying why where the view has room for it.

// Identities lists the workload identities with their rotation status.
type Identities interface {
	Identities(ctx context.Context, now time.Time) ([]Identity, error)
}

// CA describes the CA's generations, its rotations and what expires next.
type CA interface {
	CA(ctx context.Context, now time.Time) (*CAView, error)
}

// Access computes who may call whom. The value is JSON-encoded as it is:
// authz/access's matrix with the policy and mesh versions it was computed
// from (AccessView).
type Access interface {
	Access(ctx context.Context) (*AccessView, error)
}

// Denials returns this replica's recent denials, newest first.
type Denials interface {
	// Denials returns at most limit denials, whether decisions are logged
	// at all, and how many log entries were dropped.
	Denials(limit int) (denials []Denial, logging bool, dropped uint64)
}

// Journal summarises the issuance journal and verifies it.
type Journal interface {
	Journal(ctx context.Context) (*JournalView, error)
	// Verify recomputes the journal and checks it against its signed
	// checkpoints, as `trustmesh audit verify` does.
	Verify(ctx context.Context) (*VerifyResult, error)
}

// Session is GET /ui/api/session.
type Session struct {
	Replica     string    `json:"replica"`
	TrustDomain string    `json:"trust_domain"`
	CSRFToken   string    `json:"csrf_token"`
	Now         time.Time `json:"now"`
}

// Identity is one workload identity's row.
type Identity struct {
	SPIFFEID     string    `json:"spiffe_id"`
	Serial       string    `json:"serial"`
	Expires      time.Time `json:"expires"`
	LastIssued   time.Time `json:"last_issued"`
	Renewals     int       `json:"renewals"`
	LateRenewals int       `json:"late_renewals"`
	Lapses       int       `json:"lapses"`
	// Status is one of the Status constants; StatusLabel says it for
	// people.
	Status      string `json:"status"`
	StatusLabel string `json:"status_label"`
}

// Identity statuses.
const (
	StatusOnTime          = "on-time"
	StatusLate            = "late"
	StatusLapsed          = "lapsed"
	StatusStoppedRenewing = "stopped-renewing"
	StatusRevoked         = "revoked"
)

// IdentityFromAudit maps the rotation audit's record of an identity
// (ca/audit.Rotation at now) to its row. The status says how the identity
// stands now: it follows the current certificate and the latest renewal
// only, so that it clears once the identity renews on time again; the
// lifetime counts stay in their own columns (renewals, late_renewals,
// lapses). The first that holds, in this order, is the status:
//
//   - revoked ("Revoked"): its enrolment was revoked after its last
//     certificate;
//   - stopped-renewing ("Stopped renewing"): its last certificate has
//     expired and none followed (the audit's "expired");
//   - late ("Late: overdue for renewal"): its certificate is past 75% of its
//     lifetime and not renewed (the audit's "overdue");
//   - lapsed ("Lapsed: last renewed after expiry"): the latest renewal came
//     only after the previous certificate had expired, a gap in coverage;
//   - late ("Late: last renewed late"): the latest renewal came past 75% of
//     the previous certificate's lifetime;
//   - on-time ("On time"): otherwise (the audit's "ok" and "due": agents
//     renew at half their lifetime, so a certificate 60-75% through is in
//     its window).
func IdentityFromAudit(a audit.Identity, now time.Time) Identity {
	id := Identity{
		SPIFFEID: a.SPIFFEID, Serial: a.Serial, Expires: a.Expires.UTC(), LastIssued: a.LastIssued.UTC(),
		Renewals: a.Renewals, LateRenewals: a.LateRenewals, Lapses: a.Lapses,
	}
	switch {
	case a.Status == "revoked":
		id.Status, id.StatusLabel = StatusRevoked, "Revoked: its enrolment was revoked"
	case a.Status == "expired":
		id.Status, id.StatusLabel = StatusStoppedRenewing, "Stopped renewing: its certificate expired "+human.When(a.Expires, now)
	case a.Status == "overdue":
		id.Status, id.StatusLabel = StatusLate, "Late: overdue for renewal, expires "+human.When(a.Expires, now)
	case a.LastRenewal == audit.RenewalLapsed:
		id.Status, id.StatusLabel = StatusLapsed, "Lapsed: last renewed after its certificate had expired"
	case a.LastRenewal == audit.RenewalLate:
		id.Status, id.StatusLabel = StatusLate, "Late: last renewed past 75% of its certificate's lifetime"
	default:
		id.Status, id.StatusLabel = StatusOnTime, "On time"
	}
	return id
}

// IdentitiesView is GET /ui/api/identities.
type IdentitiesView struct {
	At         time.Time  `json:"at"`
	Identities []Identity `json:"identities"`
}

// CAView is GET /ui/api/ca.
type CAView struct {
	Generations  []Generation `json:"generations"`
	Events       []CAEvent    `json:"events"`
	NextExpiries []Expiry     `json:"next_expiries"`
}

// Generation is one CA certificate.
type Generation struct {
	Role        string    `json:"role"` // root or intermediate
	Subject     string    `json:"subject"`
	Serial      string    `json:"serial"`
	Fingerprint string    `json:"fingerprint"` // SHA-256, colon-separated hex
	NotBefore   time.Time `json:"not_before"`
	NotAfter    time.Time `json:"not_after"`
	// State is prepared, active, retiring or trusted.
	State string `json:"state"`
}

// CAEvent is one rotation step, from the journal.
type CAEvent struct {
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"`
	Detail string    `json:"detail"`
}

// Expiry is something that expires, or falls due, at At.
type Expiry struct {
	What string    `json:"what"`
	At   time.Time `json:"at"`
}

// AccessView is GET /ui/api/access: authz/access's matrix (its services
// and cells, JSON-encoded as access defines them) and the versions of the
// policy and mesh snapshots it was computed from.
type AccessView struct {
	PolicyVersion uint64 `json:"policy_version"`
	MeshVersion   uint64 `json:"mesh_version"`
	Services      any    `json:"services"`
	Cells         any    `json:"cells"`
}

// DenialsView is GET /ui/api/denials.
type DenialsView struct {
	Replica string   `json:"replica"`
	Logging bool     `json:"logging"`
	Dropped uint64   `json:"dropped"`
	Denials []Denial `json:"denials"`
}

// Denial is one denied request, as the decision log redacted it.
type Denial struct {
	Time        time.Time `json:"time"`
	DecisionID  string    `json:"decision_id"`
	Source      Peer      `json:"source"`
	Destination Peer      `json:"destination"`
	Method      string    `json:"method"`
	Host        string    `json:"host"`
	Path        string    `json:"path"`
	Policy      string    `json:"policy"`
	Rule        *int      `json:"rule"`
	Action      string    `json:"action"`
	Reason      string    `json:"reason"`
	// FromService and ToService are "ns/name" when the mesh knows the
	// source and destination, else "".
	FromService string `json:"from_service"`
	ToService   string `json:"to_service"`
}

// Peer is one side of a denied connection.
type Peer struct {
	Principal string `json:"principal"`
	Address   string `json:"address"`
}

// JournalView is GET /ui/api/journal.
type JournalView struct {
	Size       uint64        `json:"size"`
	Checkpoint Checkpoint    `json:"checkpoint"`
	Witness    WitnessState  `json:"witness"`
	LastVerify *VerifyResult `json:"last_verify"`
}

// Checkpoint is the journal's last signed checkpoint.
type Checkpoint struct {
	Size     uint64 `json:"size"`
	RootHash string `json:"root_hash"` // base64, as in the checkpoint
	Text     string `json:"text"`      // the signed note
}

// WitnessState is the witness's state.
type WitnessState struct {
	Configured bool   `json:"configured"`
	Target     string `json:"target"`
	State      string `json:"state"`
}

// VerifyResult is the result of POST /ui/api/journal/verify.
type VerifyResult struct {
	OK       bool      `json:"ok"`
	Checked  uint64    `json:"checked"`
	Findings []Finding `json:"findings"`
	At       time.Time `json:"at"`
}

// Finding is where the journal departs from what was signed: the first
// entry concerned (nil when none is) and what is wrong.
type Finding struct {
	Index  *uint64 `json:"index"`
	Detail string  `json:"detail"`
}
