package ca

import (
	"errors"
	"fmt"
)

// RefusalKind classifies a refusal for the caller. The server maps each kind
// to one gRPC status code.
type RefusalKind int

const (
	// KindUnauthenticated: the caller did not prove an identity.
	KindUnauthenticated RefusalKind = iota + 1
	// KindDenied: the caller proved an identity that may not have a
	// certificate (revoked, deleted, too old, or impersonating).
	KindDenied
	// KindInvalid: the request itself breaks a rule.
	KindInvalid
	// KindUnavailable: a dependency could not answer; the caller may retry.
	KindUnavailable
	// KindInternal: the CA failed, for example it could not record.
	KindInternal
)

func (k RefusalKind) String() string {
	switch k {
	case KindUnauthenticated:
		return "unauthenticated"
	case KindDenied:
		return "denied"
	case KindInvalid:
		return "invalid"
	case KindUnavailable:
		return "unavailable"
	case KindInternal:
		return "internal"
	}
	return fmt.Sprintf("RefusalKind(%d)", int(k))
}

// Reasons are short, stable labels: they become metric label values and are
// written to the record.
const (
	ReasonNoCredentials      = "no-credentials"
	ReasonTokenMalformed     = "token-malformed"
	ReasonTokenAudience      = "token-audience"
	ReasonTokenExpired       = "token-expired"
	ReasonTokenRejected      = "token-rejected"
	ReasonTokenSignature     = "token-signature"
	ReasonTokenNotSA         = "token-not-service-account"
	ReasonTokenReviewBusy    = "tokenreview-rate-limited"
	ReasonTokenReviewFailed  = "tokenreview-failed"
	ReasonKubernetesOff      = "kubernetes-not-configured"
	ReasonJoinTokenMalformed = "join-token-malformed"
	ReasonJoinTokenUnknown   = "join-token-unknown"
	ReasonJoinTokenExpired   = "join-token-expired"
	ReasonJoinTokenUsed      = "join-token-used"
	ReasonJoinTokenRevoked   = "join-token-revoked"
	ReasonCertInvalid        = "cert-invalid"
	ReasonCertNotRecorded    = "cert-not-recorded"
	ReasonCertNotRenewable   = "cert-not-renewable"
	ReasonAccountDeleted     = "service-account-deleted"
	ReasonEnrolmentRevoked   = "enrolment-revoked"
	ReasonEnrolmentExpired   = "enrolment-expired"
	ReasonRenewalCheckFailed = "renewal-check-failed"
	ReasonImpersonation      = "impersonation"
	ReasonTrustDomain        = "trust-domain"
	ReasonReserved           = "reserved-identity"
	ReasonCSRTooLarge        = "csr-too-large"
	ReasonCSRMalformed       = "csr-malformed"
	ReasonCSRSignature       = "csr-signature"
	ReasonCSRKey             = "csr-key"
	ReasonCSRIdentity        = "csr-identity"
	ReasonCSRCA              = "csr-ca"
	ReasonSignFailed         = "sign-failed"
	ReasonSelfCheckFailed    = "self-check-failed"
	ReasonRecordFailed       = "record-failed"
	// ReasonJournalTampered: the journal no longer matches its signed
	// checkpoints, so nothing it says can be trusted.
	ReasonJournalTampered = "journal-tampered"
	// ReasonJournalUnavailable: the journal's database could not be reached
	// or could not write (down, cut off, disk full); nothing was recorded,
	// so nothing was issued, and the caller may retry.
	ReasonJournalUnavailable = "journal-unavailable"

	// Delegated issuance (the node service).

	// ReasonNodeNotTrusted: the caller is not a node trusted for
	// delegation (a workload's SVID, an untrusted service account, a token
	// bound to no pod or node).
	ReasonNodeNotTrusted = "node-not-trusted"
	// ReasonNotOnNode: no workload of the identity asked for runs on the
	// node.
	ReasonNotOnNode = "not-on-node"
	// ReasonNodeIdentity: a node asked for a node identity
	// (spiffe://TD/node/...), which only the node's own enrolment gives.
	ReasonNodeIdentity = "node-identity"
	// ReasonDelegationOff: the CA has no mesh model to authorize delegated
	// requests against, so it refuses them all.
	ReasonDelegationOff = "delegation-off"
	// ReasonBatchTooLarge: a batch carries more params than the limit.
	ReasonBatchTooLarge = "batch-too-large"
	// ReasonIDMalformed: the SPIFFE ID asked for does not parse.
	ReasonIDMalformed = "spiffe-id-malformed"
	// ReasonNodeCheckFailed: the mesh model could not say whether the node
	// may hold the identity; the node may retry.
	ReasonNodeCheckFailed = "node-check-failed"
)

// Refusal is the error for every request the CA does not serve. Reason is
// safe to show in metrics; Err holds the detail for the log and the record,
// which callers must not echo to an unauthenticated client.
type Refusal struct {
	Kind   RefusalKind
	Reason string
	Err    error
}

func (r *Refusal) Error() string {
	if r.Err == nil {
		return "ca: refused (" + r.Reason + ")"
	}
	return "ca: refused (" + r.Reason + "): " + r.Err.Error()
}

func (r *Refusal) Unwrap() error { return r.Err }

func refuse(reason string, kind RefusalKind, format string, args ...any) *Refusal {
	return &Refusal{Kind: kind, Reason: reason, Err: fmt.Errorf(format, args...)}
}

func refuseErr(reason string, kind RefusalKind, err error) *Refusal {
	return &Refusal{Kind: kind, Reason: reason, Err: err}
}

// Refuse builds a Refusal for other packages of the CA (the authenticators).
func Refuse(kind RefusalKind, reason string, err error) *Refusal {
	return &Refusal{Kind: kind, Reason: reason, Err: err}
}

// AsRefusal returns the refusal in err's chain, if any.
func AsRefusal(err error) (*Refusal, bool) {
	var r *Refusal
	ok := errors.As(err, &r)
	return r, ok
}
