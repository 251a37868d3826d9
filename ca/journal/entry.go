// Package journal is the CA's durable record: an append-only sequence of
// entries (issuances, refusals, join-token creations, revocations) plus the
// enrolment state that renewal checks read. Every entry is stored as the
// exact bytes of its JSON body, so the sequence can later be committed to a
// Merkle log without re-encoding anything.
package journal

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Kind names what an entry records.
type Kind string

const (
	KindIssuance   Kind = "issuance"
	KindRefusal    Kind = "refusal"
	KindJoinToken  Kind = "join-token"
	KindRevocation Kind = "revocation"
	KindRotation   Kind = "rotation"
)

// Origin says how the identity behind a chain of renewals first proved itself.
// A renewal inherits the origin of the certificate it renews, so that the
// renewal check can ask the original authority whether the identity still
// stands.
type Origin string

const (
	OriginKubernetes Origin = "kubernetes"
	OriginJoinToken  Origin = "join-token"
	// OriginCA marks certificates the CA issues to itself, such as its serving
	// certificate. They can never be renewed by a client.
	OriginCA Origin = "ca"
	// OriginNode marks certificates a node agent obtained on behalf of a
	// workload on its node (delegated issuance). Their keys live in the
	// node agent only; they can never be renewed by a client with the
	// certificate, only issued again to the node.
	OriginNode Origin = "node"
)

// ErrNotFound is returned when a looked-up record does not exist.
var ErrNotFound = errors.New("journal: not found")

// Issuance records one certificate the CA issued.
type Issuance struct {
	Time     time.Time `json:"time"`
	Serial   string    `json:"serial"` // lower-case hex
	SPIFFEID string    `json:"spiffe_id"`
	// Method is how this request authenticated: "kubernetes", "join-token",
	// "x509-renewal", "ca" or "node-delegated".
	Method string `json:"method"`
	// Caller names the authenticated caller: the token subject, the join-token
	// id, or the renewing certificate's serial; for a delegated issuance,
	// the node's credential.
	Caller      string `json:"caller"`
	Origin      Origin `json:"origin"`
	EnrolmentID string `json:"enrolment_id,omitempty"`
	// SubjectUID is the Kubernetes service account's UID, so that a renewal
	// can tell a recreated account from the one that was authenticated.
	SubjectUID string    `json:"subject_uid,omitempty"`
	NotBefore  time.Time `json:"not_before"`
	NotAfter   time.Time `json:"not_after"`
	// Issuer is the serial of the intermediate that signed the certificate.
	Issuer          string `json:"issuer"`
	PublicKeySHA256 string `json:"public_key_sha256"`
	CertSHA256      string `json:"cert_sha256"`
	// Node is the node that obtained the certificate on the workload's
	// behalf (Origin node); empty for every other issuance, and then
	// omitted, so that leaves written before it existed keep their bytes.
	Node string `json:"node,omitempty"`
}

// Refusal records one or more refused requests that share a reason, method,
// caller and claimed identity. Count is how many were aggregated; First and
// Last bound when they happened.
type Refusal struct {
	First    time.Time `json:"first"`
	Last     time.Time `json:"last"`
	Reason   string    `json:"reason"`
	Method   string    `json:"method,omitempty"`
	Caller   string    `json:"caller,omitempty"`
	SPIFFEID string    `json:"spiffe_id,omitempty"`
	Count    int64     `json:"count"`
}

// JoinTokenCreated records the creation of a join token. The token itself is
// never recorded, only its id and its SHA-256: the signed log, not a table
// beside it, is what says which token proves which identity.
type JoinTokenCreated struct {
	Time    time.Time `json:"time"`
	TokenID string    `json:"token_id"`
	// TokenSHA256 is the hex SHA-256 of the token. A creation recorded
	// without it (before it was recorded) proves no token.
	TokenSHA256 string    `json:"token_sha256,omitempty"`
	SPIFFEID    string    `json:"spiffe_id"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// Revocation records the revocation of every enrolment of an identity.
type Revocation struct {
	Time       time.Time `json:"time"`
	SPIFFEID   string    `json:"spiffe_id"`
	Enrolments int       `json:"enrolments"`
	Tokens     int       `json:"tokens"`
}

// Rotation records a step of CA rotation: a CA certificate prepared,
// activated or retired from the trust bundle.
type Rotation struct {
	Time     time.Time `json:"time"`
	Step     string    `json:"step"` // prepare, activate, retire
	Role     string    `json:"role"` // root, intermediate
	Serial   string    `json:"serial"`
	Subject  string    `json:"subject"`
	NotAfter time.Time `json:"not_after"`
}

// Entry is one record as stored: its leaf index, kind and exact body bytes,
// and the leaf hash written beside it.
type Entry struct {
	Index    uint64
	Kind     Kind
	Body     []byte
	LeafHash []byte
}

// envelope is the stored body: the kind beside the record's own fields.
type envelope[T any] struct {
	Kind   Kind `json:"kind"`
	Record T    `json:"record"`
}

func encode[T any](kind Kind, rec T) ([]byte, error) {
	b, err := json.Marshal(envelope[T]{Kind: kind, Record: rec})
	if err != nil {
		return nil, fmt.Errorf("journal: encode %s: %w", kind, err)
	}
	return b, nil
}

// Decode returns the record an entry holds: *Issuance, *Refusal,
// *JoinTokenCreated, *Revocation or *Rotation.
func (e Entry) Decode() (any, error) {
	var rec any
	switch e.Kind {
	case KindIssuance:
		rec = &Issuance{}
	case KindRefusal:
		rec = &Refusal{}
	case KindJoinToken:
		rec = &JoinTokenCreated{}
	case KindRevocation:
		rec = &Revocation{}
	case KindRotation:
		rec = &Rotation{}
	default:
		return nil, fmt.Errorf("journal: entry %d has unknown kind %q", e.Index, e.Kind)
	}
	return e.decodeInto(rec)
}

// decodeInto decodes the entry's body into rec, which must be the record
// type of e.Kind, and checks that the body names that kind.
func (e Entry) decodeInto(rec any) (any, error) {
	env := envelope[any]{Record: rec}
	if err := json.Unmarshal(e.Body, &env); err != nil {
		return nil, fmt.Errorf("journal: decode entry %d: %w", e.Index, err)
	}
	if env.Kind != e.Kind {
		return nil, fmt.Errorf("journal: entry %d is stored as %q but its body says %q", e.Index, e.Kind, env.Kind)
	}
	return rec, nil
}
