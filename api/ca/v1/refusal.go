package cav1

import (
	"errors"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
)

// The CA tells a caller why its join token was refused in a
// google.rpc.ErrorInfo detail of the gRPC status, with domain ErrorDomain
// and one of the JoinToken* reasons. A join token never becomes valid
// later: an agent that gets one of these should stop and say so. The reason
// names only the state of the token the caller itself sent; nothing else
// about the CA is told to an unauthenticated caller.
const ErrorDomain = "ca.trustmesh.io"

const (
	// JoinTokenMalformed: the bearer token is not a join token at all.
	JoinTokenMalformed = "JOIN_TOKEN_MALFORMED"
	// JoinTokenUnknown: the CA never created this join token.
	JoinTokenUnknown = "JOIN_TOKEN_UNKNOWN"
	// JoinTokenUsed: the join token was used already; it works once.
	JoinTokenUsed = "JOIN_TOKEN_USED"
	// JoinTokenExpired: the join token was not used within its TTL.
	JoinTokenExpired = "JOIN_TOKEN_EXPIRED"
	// JoinTokenRevoked: the operator revoked the token's identity.
	JoinTokenRevoked = "JOIN_TOKEN_REVOKED"
)

// RefusalReason returns the ErrorInfo reason in err's gRPC status, if the
// CA sent one.
func RefusalReason(err error) (string, bool) {
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		return "", false
	}
	for _, d := range se.GRPCStatus().Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			return info.GetReason(), true
		}
	}
	return "", false
}
