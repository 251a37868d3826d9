// Package server serves the CA over gRPC: Istio's certificate service, so an
// unmodified istio-agent can use trustmesh as its CA, and trustmesh's trust
// bundle stream. It maps the CA's refusals to gRPC status in one place.
package server

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/utils/clock"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
)

// Issuer mints certificates for authenticated callers.
type Issuer interface {
	Issue(ctx context.Context, caller ca.Caller, csrPEM []byte, requested time.Duration) (*ca.Issued, error)
}

// Authenticator decides who is calling.
type Authenticator interface {
	Authenticate(ctx context.Context, creds authn.Credentials) (ca.Caller, error)
}

// RefusalRecorder records refusals off the request path; it must not block.
type RefusalRecorder interface {
	Record(at time.Time, reason, method, caller, spiffeID string)
}

// CertificateServiceConfig configures the certificate service.
type CertificateServiceConfig struct {
	Issuer        Issuer
	Authenticator Authenticator
	Refusals      RefusalRecorder
	Metrics       *Metrics
	Clock         clock.PassiveClock
	Log           *slog.Logger
	// TracerProvider, when set, traces each CreateCertificate: a ca.Issue
	// span, child of the caller's W3C context in the call's metadata, with
	// ca.authenticate, ca.sign and ca.journal.commit inside it. Nil turns
	// tracing off.
	TracerProvider trace.TracerProvider
}

// CertificateService implements istio.v1.auth.IstioCertificateService.
type CertificateService struct {
	pb.UnimplementedIstioCertificateServiceServer
	cfg CertificateServiceConfig
	// tracer is nil when tracing is off.
	tracer trace.Tracer
}

// NewCertificateService returns the service.
func NewCertificateService(cfg CertificateServiceConfig) *CertificateService {
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &CertificateService{cfg: cfg}
	if cfg.TracerProvider != nil {
		s.tracer = cfg.TracerProvider.Tracer(TracerName)
	}
	return s
}

// Messages for refusals. Authentication failures all get the same one, so a
// caller learns nothing from it; the detail goes to the log and the record.
const (
	msgUnauthenticated = "authentication failed"
	msgDenied          = "this identity may not obtain a certificate"
	msgUnavailable     = "the CA cannot serve this request now; try again"
	msgInternal        = "the CA could not issue a certificate"
)

// unavailableMsgs say why the CA cannot serve now where the reason is the
// CA's own state, not the caller's: it tells the caller nothing about its
// credentials, and tells the operator reading the agent's log where to look.
var unavailableMsgs = map[string]string{
	ca.ReasonJournalUnavailable: "the CA cannot record issuances now (its journal is unavailable); try again",
	ca.ReasonTokenReviewFailed:  "the CA cannot reach the Kubernetes TokenReview API to review the token now; try again",
	ca.ReasonClockBehind:        "the CA's clock is behind its journal's newest issuance by more than its allowance; it signs nothing until its clock is corrected",
	ca.ReasonClockBeforeIssuer:  "the CA's clock is before its issuing certificate's validity; it signs nothing until its clock is corrected",
	ca.ReasonClockUnchecked:     "the CA cannot read its journal to check its clock now; try again",
}

// impersonationKey is the metadata field istiod uses to ask for another
// node's identity. trustmesh never issues one identity to another's caller.
const impersonationKey = "ImpersonatedIdentity"

// CreateCertificate authenticates the caller, then issues a certificate for
// the caller's own identity.
func (s *CertificateService) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (_ *pb.IstioCertificateResponse, err error) {
	start := s.cfg.Clock.Now()
	ctx, span := s.startIssue(ctx)
	defer func() { endIssue(span, err) }()
	creds := credentialsFrom(ctx)
	caller, err := s.authenticate(ctx, creds)
	if err == nil && req.GetMetadata().GetFields()[impersonationKey] != nil {
		err = ca.Refuse(ca.KindDenied, ca.ReasonImpersonation, errors.New("impersonation of another identity is not supported"))
	}
	var issued *ca.Issued
	if err == nil {
		issued, err = s.cfg.Issuer.Issue(ctx, caller, []byte(req.GetCsr()), time.Duration(req.GetValidityDuration())*time.Second)
	}
	if err != nil {
		return nil, s.refusal(span, start, creds, caller, err)
	}
	s.cfg.Metrics.issue(caller.Method, s.cfg.Clock.Since(start))
	if span.IsRecording() {
		span.SetAttributes(attribute.String(ca.AttrSPIFFEID, caller.ID.String()), attribute.String(AttrSerial, ca.SerialHex(issued.Leaf)))
	}
	s.cfg.Log.Info("issued certificate", "spiffe_id", caller.ID.String(), "method", caller.Method,
		"caller", caller.Subject, "serial", ca.SerialHex(issued.Leaf), "not_after", issued.Leaf.NotAfter)
	return &pb.IstioCertificateResponse{CertChain: issued.PEMChain()}, nil
}

// refusal logs, counts and records a refusal and returns its gRPC status.
// This is the one place CA errors become gRPC codes.
func (s *CertificateService) refusal(span trace.Span, start time.Time, creds authn.Credentials, caller ca.Caller, err error) error {
	r, ok := ca.AsRefusal(err)
	if !ok {
		r = ca.Refuse(ca.KindInternal, "internal", err)
	}
	if span.IsRecording() {
		span.SetAttributes(attribute.String(AttrRefusal, r.Reason))
	}
	var code codes.Code
	var msg string
	switch r.Kind {
	case ca.KindUnauthenticated:
		code, msg = codes.Unauthenticated, msgUnauthenticated
	case ca.KindDenied:
		code, msg = codes.PermissionDenied, msgDenied
	case ca.KindInvalid:
		// The caller is authenticated: telling it which rule its request
		// broke reveals nothing it does not know.
		code, msg = codes.InvalidArgument, r.Err.Error()
	case ca.KindUnavailable:
		code, msg = codes.Unavailable, msgUnavailable
		if m, ok := unavailableMsgs[r.Reason]; ok {
			msg = m
		}
	default:
		code, msg = codes.Internal, msgInternal
	}
	method := caller.Method
	if method == "" {
		method = attemptedMethod(creds)
	}
	if r.Reason == ca.ReasonJoinTokenMalformed {
		method = "join-token"
	}
	idStr := ""
	if !caller.ID.IsZero() {
		idStr = caller.ID.String()
	}
	// Only authenticated names are recorded: anything taken from an
	// unverified credential is the caller's to choose, and would let a
	// flood of refusals write whatever it likes into the journal.
	callerName := caller.Subject
	if callerName == "" && len(creds.PeerCertificates) > 0 {
		callerName = "x509:unverified"
	}
	s.cfg.Refusals.Record(s.cfg.Clock.Now(), r.Reason, method, callerName, idStr)
	s.cfg.Metrics.refuse(r, code.String(), s.cfg.Clock.Since(start))
	level := slog.LevelWarn
	if r.Kind == ca.KindInternal {
		level = slog.LevelError
	}
	s.cfg.Log.Log(context.Background(), level, "refused certificate request",
		"reason", r.Reason, "code", code.String(), "method", method, "caller", callerName, "spiffe_id", idStr, "error", r.Err)
	return refusalStatus(code, msg, r.Reason)
}

// joinTokenRefusals say why a join token was refused, on the wire and to
// the agent's operator. They describe only the token the caller sent, which
// never becomes valid later, so the agent can stop and say what to do.
var joinTokenRefusals = map[string]struct{ wire, msg string }{
	ca.ReasonJoinTokenMalformed: {cav1.JoinTokenMalformed, "the join token is malformed"},
	ca.ReasonJoinTokenUnknown:   {cav1.JoinTokenUnknown, "the join token is unknown to this CA"},
	ca.ReasonJoinTokenUsed:      {cav1.JoinTokenUsed, "the join token was used already"},
	ca.ReasonJoinTokenExpired:   {cav1.JoinTokenExpired, "the join token expired"},
	ca.ReasonJoinTokenRevoked:   {cav1.JoinTokenRevoked, "the join token was revoked"},
}

// refusalStatus is the gRPC status of a refusal: code and msg, and for a
// join token the reason as an ErrorInfo detail.
func refusalStatus(code codes.Code, msg, reason string) error {
	jt, ok := joinTokenRefusals[reason]
	if !ok {
		return status.Error(code, msg)
	}
	st, err := status.New(code, msg+": "+jt.msg).WithDetails(&errdetails.ErrorInfo{Domain: cav1.ErrorDomain, Reason: jt.wire})
	if err != nil {
		return status.Error(code, msg+": "+jt.msg)
	}
	return st.Err()
}

func attemptedMethod(creds authn.Credentials) string {
	switch {
	case creds.BearerToken != "" && authn.IsJoinToken(creds.BearerToken):
		return "join-token"
	case creds.BearerToken != "":
		return "kubernetes"
	case len(creds.PeerCertificates) > 0:
		return "x509-renewal"
	}
	return "none"
}

// credentialsFrom collects the bearer token and the TLS client chain.
func credentialsFrom(ctx context.Context) authn.Credentials {
	var c authn.Credentials
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		for _, v := range md.Get("authorization") {
			if tok, ok := authn.BearerFromHeader(v); ok {
				c.BearerToken = tok
				break
			}
		}
	}
	c.PeerCertificates = peerCertificates(ctx)
	return c
}

func peerCertificates(ctx context.Context) []*x509.Certificate {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil
	}
	return info.State.PeerCertificates
}
