package server

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/internal/tracing"
)

// DelegatedIssuer is the CA as the node service uses it; *ca.CA is one.
type DelegatedIssuer interface {
	IssueDelegated(ctx context.Context, node ca.Node, reqs []ca.DelegatedRequest) []ca.DelegatedResult
	// NodeEntries lists what a node may hold, from the CA's NodeAuthorizer.
	// Entries it may never be issued are left out.
	NodeEntries(ctx context.Context, node ca.Node) ([]ca.NodeEntry, string, error)
}

// NodeAuthenticator decides which node is calling; *authn.NodeAuthenticator
// is one.
type NodeAuthenticator interface {
	Authenticate(ctx context.Context, creds authn.Credentials) (ca.Node, error)
}

// NodeServiceConfig configures the node service.
type NodeServiceConfig struct {
	CA            DelegatedIssuer
	Authenticator NodeAuthenticator
	Refusals      RefusalRecorder
	// Metrics may be nil.
	Metrics *Metrics
	Clock   clock.PassiveClock
	Log     *slog.Logger
	// TracerProvider, when set, traces each BatchNewX509SVID: a
	// ca.IssueDelegated span, child of the caller's W3C context, with a
	// ca.sign and ca.journal.commit per issued param inside it. Nil turns
	// tracing off.
	TracerProvider trace.TracerProvider
}

// NodeService implements trustmesh.ca.v1.NodeService: the CA's delegated,
// batched issuance for node agents (ambient mode).
type NodeService struct {
	cav1.UnimplementedNodeServiceServer
	cfg NodeServiceConfig
	// tracer is nil when tracing is off.
	tracer trace.Tracer
}

// NewNodeService returns the service.
func NewNodeService(cfg NodeServiceConfig) *NodeService {
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &NodeService{cfg: cfg}
	if cfg.TracerProvider != nil {
		s.tracer = cfg.TracerProvider.Tracer(TracerName)
	}
	return s
}

// Span and attribute names of a traced BatchNewX509SVID.
const (
	SpanIssueDelegated = "ca.IssueDelegated"
	AttrNode           = "ca.node"
	AttrBatchSize      = "ca.batch.size"
	AttrBatchIssued    = "ca.batch.issued"
)

// startBatch starts the ca.IssueDelegated server span, child of the W3C
// context in the call's metadata. With tracing off it starts nothing.
func (s *NodeService) startBatch(ctx context.Context, n int) (context.Context, trace.Span) {
	if s.tracer == nil {
		return ctx, noSpan
	}
	parent, _ := tracing.FromIncomingGRPC(ctx)
	return s.tracer.Start(parent, SpanIssueDelegated, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("rpc.system", "grpc"),
			attribute.String("rpc.service", "trustmesh.ca.v1.NodeService"),
			attribute.String("rpc.method", rpcBatch), attribute.Int(AttrBatchSize, n)))
}

// RPC names, as metric labels.
const (
	rpcFetchEntries = "FetchEntries"
	rpcBatch        = "BatchNewX509SVID"
)

// Messages of node service refusals.
const (
	msgNodeNotTrusted = "the caller is not a node trusted for delegation"
	msgNotOnNode      = "no workload of this identity runs on the node"
)

// wireReasons are the ErrorInfo reasons of the node-specific refusals.
var wireReasons = map[string]string{
	ca.ReasonNodeNotTrusted: cav1.NodeNotTrusted,
	ca.ReasonNotOnNode:      cav1.NotOnNode,
}

// wireReason is what a node is told a refusal's reason is: NODE_NOT_TRUSTED
// or NOT_ON_NODE for those, else the journal's reason.
func wireReason(reason string) string {
	if w, ok := wireReasons[reason]; ok {
		return w
	}
	return reason
}

// FetchEntries lists the identities the calling node may hold.
func (s *NodeService) FetchEntries(ctx context.Context, _ *cav1.FetchEntriesRequest) (*cav1.FetchEntriesResponse, error) {
	creds := credentialsFrom(ctx)
	node, err := s.cfg.Authenticator.Authenticate(ctx, creds)
	if err != nil {
		return nil, s.refuseCall(rpcFetchEntries, creds, node, err)
	}
	entries, rev, err := s.cfg.CA.NodeEntries(ctx, node)
	if err != nil {
		return nil, s.refuseCall(rpcFetchEntries, creds, node, err)
	}
	resp := &cav1.FetchEntriesResponse{Node: node.Name, Revision: rev, Entries: make([]*cav1.Entry, 0, len(entries))}
	for _, e := range entries {
		resp.Entries = append(resp.Entries, &cav1.Entry{SpiffeId: e.ID.String(), Selectors: append([]string(nil), e.Selectors...)})
	}
	return resp, nil
}

// maxTTLSeconds keeps a lifetime in seconds from overflowing a Duration; the
// CA clamps it to its maximum anyway.
const maxTTLSeconds = math.MaxInt64 / int64(time.Second)

// BatchNewX509SVID issues one certificate per param, each authorized on its
// own. Only a call that is not a node's, or is too large, fails as a whole.
func (s *NodeService) BatchNewX509SVID(ctx context.Context, req *cav1.BatchNewX509SVIDRequest) (_ *cav1.BatchNewX509SVIDResponse, err error) {
	start := s.cfg.Clock.Now()
	params := req.GetParams()
	ctx, span := s.startBatch(ctx, len(params))
	defer func() { endIssue(span, err) }()
	creds := credentialsFrom(ctx)
	if len(params) > cav1.MaxBatch {
		// Before authentication: nothing is learnt from it, and no
		// TokenReview is spent on a call that cannot be served.
		return nil, s.refuseCall(rpcBatch, creds, ca.Node{}, ca.Refuse(ca.KindInvalid, ca.ReasonBatchTooLarge,
			fmt.Errorf("a batch carries at most %d params, not %d; split it", cav1.MaxBatch, len(params))))
	}
	node, err := s.cfg.Authenticator.Authenticate(ctx, creds)
	if err != nil {
		return nil, s.refuseCall(rpcBatch, creds, node, err)
	}
	s.cfg.Metrics.batch(len(params))
	results := make([]*cav1.NewX509SVIDResult, len(params))
	reqs := make([]ca.DelegatedRequest, 0, len(params))
	at := make([]int, 0, len(params)) // reqs[j] answers params[at[j]]
	for i, p := range params {
		id, err := spiffeid.FromString(p.GetSpiffeId())
		if err != nil {
			results[i] = s.paramRefused(node, p.GetSpiffeId(),
				ca.Refuse(ca.KindInvalid, ca.ReasonIDMalformed, fmt.Errorf("spiffe_id %q: %w", p.GetSpiffeId(), err)))
			continue
		}
		ttl := p.GetTtlSeconds()
		if ttl > maxTTLSeconds {
			ttl = maxTTLSeconds
		}
		reqs = append(reqs, ca.DelegatedRequest{ID: id, CSR: p.GetCsr(), TTL: time.Duration(ttl) * time.Second})
		at = append(at, i)
	}
	issued := 0
	for j, r := range s.cfg.CA.IssueDelegated(ctx, node, reqs) {
		i := at[j]
		if r.Err != nil {
			results[i] = s.paramRefused(node, reqs[j].ID.String(), r.Err)
			continue
		}
		chain := make([][]byte, 0, 1+len(r.Issued.Chain))
		chain = append(chain, r.Issued.Leaf.Raw)
		for _, c := range r.Issued.Chain {
			chain = append(chain, c.Raw)
		}
		results[i] = &cav1.NewX509SVIDResult{Code: int32(codes.OK), CertChain: chain}
		s.cfg.Metrics.delegatedResult("issued")
		issued++
	}
	if span.IsRecording() {
		span.SetAttributes(attribute.String(AttrNode, node.Name), attribute.Int(AttrBatchIssued, issued))
	}
	s.cfg.Log.Info("delegated issuance", "node", node.Name, "caller", node.Subject, "params", len(params),
		"issued", issued, "refused", len(params)-issued, "duration", s.cfg.Clock.Since(start))
	return &cav1.BatchNewX509SVIDResponse{Results: results}, nil
}

// statusOf is the gRPC code and message a refusal gets on the wire. The
// same mapping as the certificate service's, but a node is told which node
// rule it broke.
func statusOf(r *ca.Refusal) (codes.Code, string) {
	switch r.Kind {
	case ca.KindUnauthenticated:
		return codes.Unauthenticated, msgUnauthenticated
	case ca.KindDenied:
		switch r.Reason {
		case ca.ReasonNodeNotTrusted:
			return codes.PermissionDenied, msgNodeNotTrusted
		case ca.ReasonNotOnNode:
			return codes.PermissionDenied, msgNotOnNode
		}
		return codes.PermissionDenied, msgDenied
	case ca.KindInvalid:
		return codes.InvalidArgument, r.Err.Error()
	case ca.KindUnavailable:
		return codes.Unavailable, msgUnavailable
	}
	return codes.Internal, msgInternal
}

func asRefusal(err error) *ca.Refusal {
	if r, ok := ca.AsRefusal(err); ok {
		return r
	}
	return ca.Refuse(ca.KindInternal, "internal", err)
}

// paramRefused records, counts and logs one refused param and returns its
// result.
func (s *NodeService) paramRefused(node ca.Node, id string, err error) *cav1.NewX509SVIDResult {
	r := asRefusal(err)
	code, msg := statusOf(r)
	s.cfg.Refusals.Record(s.cfg.Clock.Now(), r.Reason, ca.MethodNodeDelegated, node.Subject, id)
	s.cfg.Metrics.delegatedResult(r.Reason)
	level := slog.LevelWarn
	if r.Kind == ca.KindInternal {
		level = slog.LevelError
	}
	s.cfg.Log.Log(context.Background(), level, "refused delegated certificate",
		"node", node.Name, "caller", node.Subject, "spiffe_id", id, "reason", r.Reason, "code", code.String(), "error", r.Err)
	return &cav1.NewX509SVIDResult{Code: int32(code), Message: msg, Reason: wireReason(r.Reason)}
}

// refuseCall records, counts and logs a call refused as a whole and
// returns its status, with an ErrorInfo for the node-specific reasons.
func (s *NodeService) refuseCall(rpc string, creds authn.Credentials, node ca.Node, err error) error {
	r := asRefusal(err)
	code, msg := statusOf(r)
	// Only authenticated names are recorded, as for the certificate
	// service.
	callerName := node.Subject
	if callerName == "" && len(creds.PeerCertificates) > 0 {
		callerName = "x509:unverified"
	}
	idStr := ""
	if !node.ID.IsZero() {
		idStr = node.ID.String()
	}
	s.cfg.Refusals.Record(s.cfg.Clock.Now(), r.Reason, ca.MethodNodeDelegated, callerName, idStr)
	s.cfg.Metrics.nodeRefuse(rpc, r.Reason, code.String())
	level := slog.LevelWarn
	if r.Kind == ca.KindInternal {
		level = slog.LevelError
	}
	s.cfg.Log.Log(context.Background(), level, "refused node service call", "rpc", rpc, "node", node.Name,
		"caller", callerName, "reason", r.Reason, "code", code.String(), "error", r.Err)
	w, ok := wireReasons[r.Reason]
	if !ok {
		return refusalStatus(code, msg, r.Reason)
	}
	st, derr := status.New(code, msg).WithDetails(&errdetails.ErrorInfo{Domain: cav1.ErrorDomain, Reason: w})
	if derr != nil {
		return status.Error(code, msg)
	}
	return st.Err()
}

var _ cav1.NodeServiceServer = (*NodeService)(nil)
