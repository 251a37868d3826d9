// Command opa-standin is the opa-envoy-plugin stand-in of the authz
// benchmark (bench/authz.sh): an Envoy ext_authz v3 gRPC server that does,
// per call, the steps opa-envoy-plugin v1.19 does, so that trustmesh's
// CUSTOM Rego providers can be set beside it in the same run. The plugin is
// not on the module proxy; its costs are copied step by step, not its code:
//
//   - a decision ID from crypto/rand and a fresh OPA metrics set with the
//     server-handler timer running (NewEvalResult);
//   - a read transaction on the in-memory store, closed after the call;
//   - protojson.Marshal of the CheckRequest, util.UnmarshalJSON into a
//     map[string]interface{}, then input.version, parsed_path and
//     parsed_query from url.Parse of the raw path, parsed_body and
//     truncated_body (RequestToInput);
//   - ast.InterfaceToValue of that map;
//   - the query data.<decision> prepared once, evaluated with the parsed
//     input, the transaction, the metrics, a print hook and the inter-query
//     builtin cache;
//   - the response: the status, and dynamic metadata carrying the decision
//     ID as the plugin adds it.
//
// It serves grpc-go's defaults, plaintext or mTLS (client certificates
// required), as trustmesh authz does. Decision logging stays off, as in
// the plugin's default configuration.
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
	"github.com/open-policy-agent/opa/v1/metrics"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown/cache"
	"github.com/open-policy-agent/opa/v1/topdown/print"
	"github.com/open-policy-agent/opa/v1/util"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
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
	store storage.Store
	query rego.PreparedEvalQuery
	cache cache.InterQueryCache
}

func newServer(ctx context.Context, file, src, decision string) (*server, error) {
	store := inmem.New()
	ref := "data." + strings.ReplaceAll(strings.Trim(decision, "/"), "/", ".")
	pq, err := rego.New(
		rego.Query(ref),
		rego.Module(file, src),
		rego.Store(store),
		rego.EnablePrintStatements(true),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, err
	}
	return &server{
		store: store,
		query: pq,
		cache: cache.NewInterQueryCache(nil),
	}, nil
}

type printHook struct{ id string }

func (h printHook) Print(pctx print.Context, msg string) error {
	fmt.Fprintf(os.Stderr, "%s %v: %s\n", h.id, pctx.Location, msg)
	return nil
}

func (s *server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	// NewEvalResult: a decision ID and a metrics set.
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return nil, err
	}
	decisionID := hex.EncodeToString(id[:])
	m := metrics.New()
	m.Timer(metrics.ServerHandler).Start()
	defer m.Timer(metrics.ServerHandler).Stop()

	txn, err := s.store.NewTransaction(ctx)
	if err != nil {
		return nil, err
	}
	defer s.store.Abort(ctx, txn)

	input, err := requestToInput(req)
	if err != nil {
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: err.Error()}}, nil
	}
	v, err := ast.InterfaceToValue(input)
	if err != nil {
		return nil, err
	}
	rs, err := s.query.Eval(ctx,
		rego.EvalParsedInput(v),
		rego.EvalTransaction(txn),
		rego.EvalMetrics(m),
		rego.EvalInterQueryBuiltinCache(s.cache),
		rego.EvalPrintHook(printHook{id: decisionID}),
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
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(code)},
		DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"decision_id": structpb.NewStringValue(decisionID),
		}},
	}, nil
}

// requestToInput is the plugin's input: the CheckRequest in protojson read
// back into a map, with version, parsed_path, parsed_query, parsed_body
// and truncated_body.
func requestToInput(req *authv3.CheckRequest) (map[string]any, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, err
	}
	var input map[string]any
	if err := util.UnmarshalJSON(bs, &input); err != nil {
		return nil, err
	}
	input["version"] = map[string]string{"ext_authz": "v3", "encoding": "protojson"}
	h := req.GetAttributes().GetRequest().GetHttp()
	u, err := url.Parse(h.GetPath())
	if err != nil {
		return nil, err
	}
	segs := strings.Split(strings.TrimLeft(u.Path, "/"), "/")
	path := make([]any, len(segs))
	for i, s := range segs {
		path[i] = s
	}
	query := map[string]any{}
	for k, vs := range u.Query() {
		a := make([]any, len(vs))
		for i, v := range vs {
			a[i] = v
		}
		query[k] = a
	}
	input["parsed_path"] = path
	input["parsed_query"] = query
	var body any
	truncated := false
	if ct := h.GetHeaders()["content-type"]; strings.Contains(ct, "application/json") && h.GetBody() != "" {
		if cl, ok := h.GetHeaders()["content-length"]; ok {
			n, err := strconv.ParseInt(cl, 10, 64)
			if err != nil {
				return nil, err
			}
			truncated = n != -1 && n > int64(len(h.GetBody()))
		}
		if !truncated {
			if err := util.Unmarshal([]byte(h.GetBody()), &body); err != nil {
				return nil, err
			}
		}
	}
	input["parsed_body"] = body
	input["truncated_body"] = truncated
	return input, nil
}
