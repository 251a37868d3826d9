// Command opa-standin is the opa-envoy-plugin stand-in of the authz
// benchmark (bench/authz.sh): an Envoy ext_authz v3 gRPC server that does,
// per call, the steps opa-envoy-plugin v1.19 does, so that trustmesh's
// CUSTOM Rego providers can be set beside it in the same run. The plugin is
// not on the module proxy; its costs are copied step by step, not its code.
// Each step names the plugin's file and function it stands for:
//
//   - internal/internal.go check: envoyauth.NewEvalResult (envoyauth/
//     response.go: a fresh OPA metrics set with the server-handler timer
//     running, and a random UUID as decision ID, made whether or not
//     decision logs are on); result.GetTxn, a read transaction on the store,
//     aborted after the call; the manager's logger WithFields the decision
//     ID;
//   - envoyauth/request.go RequestToInput: the CheckRequest walked by
//     protobuf reflection into a map[string]any under JSON names
//     (envoyauth/protomap.go protomap; the plugin has done this instead of
//     protojson.Marshal + JSON decoding since opa-envoy-plugin PR #631,
//     January 2025), then version as a prebuilt Rego object, parsed_path
//     and parsed_query (getParsedPathAndQuery: strings.Cut at '?',
//     url.PathUnescape, url.ParseQuery), parsed_body and truncated_body
//     (getParsedBody, the application/json case: util.UnmarshalJSON), and
//     source_principal;
//   - internal/internal.go check: ast.InterfaceToValue of that map;
//   - envoyauth/evaluation.go Eval: the prepare options assembled per call
//     for CreatePreparedQueryOnce (the query itself is prepared once), a
//     print hook whose logger is WithFields the decision ID again, and
//     PreparedEvalQuery.Eval with the parsed input, the transaction, the
//     metrics, the inter-query builtin cache, the print hook and the
//     non-deterministic builtin cache (nil: off by default);
//   - internal/internal.go check: the response, the status and dynamic
//     metadata carrying the decision ID.
//
// What the plugin does only when configured (decision logs, performance
// metrics, tracing, gRPC bodies) is off, as in its default configuration.
// It serves grpc-go's defaults (the plugin's MaxRecvMsgSize and
// MaxSendMsgSize are grpc-go's defaults), plaintext or mTLS (client
// certificates required), as trustmesh authz does.
//
// The stand-in links the OPA of this module (go.mod), not the plugin's
// own (v1.19.1 for plugin v1.19.1). The same source built on OPA v1.19.1
// makes 486 allocations per check of the sample requests against 388 on
// v1.22.2, so the stand-in is, if anything, cheaper than the plugin. It is
// calibrated against the no-op floor before it counts.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/logging"
	"github.com/open-policy-agent/opa/v1/metrics"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown/builtins"
	"github.com/open-policy-agent/opa/v1/topdown/cache"
	"github.com/open-policy-agent/opa/v1/topdown/print"
	"github.com/open-policy-agent/opa/v1/util"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "opa-standin: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	listen := flag.String("listen", "127.0.0.1:9191", "address to serve on")
	policy := flag.String("policy", "", "Rego policy file (required)")
	decision := flag.String("decision", "envoy/authz/allow", "decision path, as the plugin's path setting")
	cert := flag.String("tls-cert", "", "server certificate (PEM); with -tls-key and -client-ca, serve mTLS")
	key := flag.String("tls-key", "", "server private key (PEM)")
	clientCA := flag.String("client-ca", "", "CA bundle client certificates must chain to (PEM)")
	flag.Parse()
	if *policy == "" {
		return errors.New("-policy is required")
	}
	src, err := os.ReadFile(*policy)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	s, err := newServer(ctx, *policy, string(src), *decision)
	if err != nil {
		return err
	}
	var opts []grpc.ServerOption
	if *cert != "" || *key != "" || *clientCA != "" {
		creds, err := mtls(*cert, *key, *clientCA)
		if err != nil {
			return err
		}
		opts = append(opts, grpc.Creds(creds))
	}
	gs := grpc.NewServer(opts...)
	authv3.RegisterAuthorizationServer(gs, s)
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "opa-standin: serving %s on %s\n", *decision, l.Addr())
	go func() {
		<-ctx.Done()
		gs.Stop()
	}()
	return gs.Serve(l)
}

func mtls(certFile, keyFile, caFile string) (credentials.TransportCredentials, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("mTLS needs -tls-cert, -tls-key and -client-ca")
	}
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificates", caFile)
	}
	return credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{kp},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}), nil
}

type server struct {
	authv3.UnimplementedAuthorizationServer
	store  storage.Store
	query  rego.PreparedEvalQuery
	cache  cache.InterQueryCache
	logger logging.Logger
	ref    ast.Body
}

func newServer(ctx context.Context, file, src, decision string) (*server, error) {
	store := inmem.New()
	ref := "data." + strings.ReplaceAll(strings.Trim(decision, "/"), "/", ".")
	body, err := ast.ParseBody(ref)
	if err != nil {
		return nil, err
	}
	pq, err := rego.New(
		rego.ParsedQuery(body),
		rego.Module(file, src),
		rego.Store(store),
		rego.EnablePrintStatements(true),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, err
	}
	return &server{
		store:  store,
		query:  pq,
		cache:  cache.NewInterQueryCache(nil),
		logger: logging.New(),
		ref:    body,
	}, nil
}

type printHook struct{ logger logging.Logger }

func (h *printHook) Print(pctx print.Context, msg string) error {
	h.logger.Info("%v: %s", pctx.Location, msg)
	return nil
}

func (s *server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	// NewEvalResult: a metrics set with the handler timer, a decision ID.
	m := metrics.New()
	decisionID := uuid4()
	m.Timer(metrics.ServerHandler).Start()
	defer m.Timer(metrics.ServerHandler).Stop()

	txn, err := s.store.NewTransaction(ctx)
	if err != nil {
		return nil, err
	}
	defer s.store.Abort(ctx, txn)
	logger := s.logger.WithFields(map[string]any{"decision-id": decisionID})

	input, err := requestToInput(req)
	if err != nil {
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: err.Error()}}, nil
	}
	v, err := ast.InterfaceToValue(input)
	if err != nil {
		return nil, err
	}
	// Eval: the prepare options are assembled on every call; the query
	// behind them was prepared once.
	s.preparedOnce([]func(*rego.Rego){
		rego.Metrics(m),
		rego.ParsedQuery(s.ref),
		rego.Store(s.store),
		rego.Transaction(txn),
		rego.EnablePrintStatements(true),
	})
	hook := &printHook{logger: logger.WithFields(map[string]any{"decision-id": decisionID})}
	var ndb builtins.NDBCache
	rs, err := s.query.Eval(ctx,
		rego.EvalParsedInput(v),
		rego.EvalTransaction(txn),
		rego.EvalMetrics(m),
		rego.EvalInterQueryBuiltinCache(s.cache),
		rego.EvalPrintHook(hook),
		rego.EvalNDBuiltinCache(ndb),
	)
	if err != nil {
		return nil, err
	}
	if len(rs) != 1 {
		return nil, fmt.Errorf("%d results", len(rs))
	}
	allowed, ok := rs[0].Expressions[0].Value.(bool)
	if !ok {
		return nil, fmt.Errorf("decision is %T, want a boolean", rs[0].Expressions[0].Value)
	}
	code := codes.PermissionDenied
	if allowed {
		code = codes.OK
	}
	resp := &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(code)}}
	resp.DynamicMetadata = &structpb.Struct{Fields: make(map[string]*structpb.Value, 1)}
	resp.DynamicMetadata.Fields["decision_id"] = structpb.NewStringValue(decisionID)
	return resp, nil
}

// preparedOnce stands for the plugin's CreatePreparedQueryOnce, which
// receives the prepare options on every call and uses them only the first
// time; s.query was prepared in newServer.
//
//go:noinline
func (s *server) preparedOnce(opts []func(*rego.Rego)) *rego.PreparedEvalQuery {
	_ = opts
	return &s.query
}

// uuid4 is a random (version 4) UUID, as the plugin's decision IDs.
func uuid4() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:], b[10:])
	return string(out[:])
}

// v3Version is input.version, built once as the plugin builds it.
var v3Version = ast.NewObject(
	[2]*ast.Term{ast.StringTerm("ext_authz"), ast.StringTerm("v3")},
	[2]*ast.Term{ast.StringTerm("encoding"), ast.StringTerm("protojson")},
)

// requestToInput is the plugin's input: the CheckRequest as a map by
// reflection (messageMap), with version, parsed_path, parsed_query,
// parsed_body, truncated_body and source_principal.
func requestToInput(req *authv3.CheckRequest) (map[string]any, error) {
	input := messageMap(req.ProtoReflect())
	h := req.GetAttributes().GetRequest().GetHttp()
	input["version"] = v3Version
	rawPath, rawQuery, _ := strings.Cut(h.GetPath(), "?")
	p, err := url.PathUnescape(rawPath)
	if err != nil {
		return nil, err
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, err
	}
	query := make(map[string]any, len(q))
	for k, vs := range q {
		query[k] = vs
	}
	input["parsed_path"] = strings.Split(strings.TrimLeft(p, "/"), "/")
	input["parsed_query"] = query
	body, truncated, err := parsedBody(h.GetHeaders(), h.GetBody(), h.GetRawBody())
	if err != nil {
		return nil, err
	}
	input["parsed_body"] = body
	input["truncated_body"] = truncated
	if sp := req.GetAttributes().GetSource().GetPrincipal(); sp != "" {
		input["source_principal"] = sp
	}
	return input, nil
}

// parsedBody is the plugin's body parsing for JSON bodies, the only kind the
// benchmark's requests carry; other content types are left unparsed.
func parsedBody(headers map[string]string, body string, raw []byte) (any, bool, error) {
	if headers["x-envoy-auth-partial-body"] == "true" {
		return nil, true, nil
	}
	if !strings.Contains(headers["content-type"], "application/json") {
		return nil, false, nil
	}
	if body == "" {
		if len(raw) == 0 {
			return nil, false, nil
		}
		body = string(raw)
	}
	if cl, ok := headers["content-length"]; ok {
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil {
			return nil, false, err
		}
		if n != -1 && n > int64(len(body)) {
			return nil, true, nil
		}
	}
	var data any
	if err := util.UnmarshalJSON([]byte(body), &data); err != nil {
		return nil, false, err
	}
	return data, false, nil
}

// messageMap walks a message's populated fields into a map keyed by their
// JSON names: messages recursively (google.protobuf.Struct through its
// AsMap), maps and lists element by element, scalars as protoreflect
// gives them.
func messageMap(m protoreflect.Message) map[string]any {
	if s, ok := m.Interface().(interface{ AsMap() map[string]any }); ok {
		return s.AsMap()
	}
	out := make(map[string]any, m.Descriptor().Fields().Len())
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			mv := v.Map()
			sub := make(map[string]any, mv.Len())
			isMsg := fd.MapValue().Kind() == protoreflect.MessageKind
			mv.Range(func(k protoreflect.MapKey, e protoreflect.Value) bool {
				if isMsg {
					sub[k.String()] = messageMap(e.Message())
				} else {
					sub[k.String()] = e.Interface()
				}
				return true
			})
			out[fd.JSONName()] = sub
		case fd.IsList():
			l := v.List()
			sub := make([]any, l.Len())
			for i := range sub {
				if fd.Kind() == protoreflect.MessageKind {
					sub[i] = messageMap(l.Get(i).Message())
				} else {
					sub[i] = l.Get(i).Interface()
				}
			}
			out[fd.JSONName()] = sub
		case fd.Kind() == protoreflect.MessageKind:
			out[fd.JSONName()] = messageMap(v.Message())
		default:
			out[fd.JSONName()] = v.Interface()
		}
		return true
	})
	return out
}
