package engine

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// oldEnvoyInput is the input as the provider built it before
// envoyInputValue: protojson text, a map, then ast.InterfaceToValue.
func oldEnvoyInput(req *authv3.CheckRequest, path string) (ast.Value, error) {
	in, err := EnvoyInput(req, path)
	if err != nil {
		return nil, err
	}
	return ast.InterfaceToValue(in)
}

// sampleRequests are the example requests of the repository (examples/
// policies/requests) and a request of every shape the random ones draw
// from, with everything set.
func sampleRequests(t testing.TB) []*authv3.CheckRequest {
	t.Helper()
	files, err := filepath.Glob("../../examples/policies/requests/*.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no example requests: %v", err)
	}
	var out []*authv3.CheckRequest
	for _, f := range files {
		bs, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		req := &authv3.CheckRequest{}
		if err := protojson.Unmarshal(bs, req); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out = append(out, req)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20; i++ {
		out = append(out, randomCheckRequest(r, true))
	}
	return out
}

var (
	randMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", ""}
	randSegs    = []string{"api", "v1", "orders", "catalog", "admin", "a%20b", "%2F", "héllo", "x", "", "status", "%zz"}
	randQueries = []string{"", "?a=1", "?a=1&a=2&b=", "?q=%20x#frag", "?k", "?bad=%zz", "?x=1;y=2", "?"}
	randBodies  = []string{"", `{"a":1,"b":[true,null,"s"],"c":{"d":1.5e3}}`, `[1,2,3]`, `"x"`, `{bad`, `12345678901234567890`}
)

// randomCheckRequest draws a CheckRequest over every field kind the walk
// handles: strings, maps, int32/uint32/int64 (size), bytes (raw_body),
// enums, a Timestamp, and (withWKT) Struct and Any metadata.
func randomCheckRequest(r *rand.Rand, withWKT bool) *authv3.CheckRequest {
	pick := func(xs []string) string { return xs[r.IntN(len(xs))] }
	var segs []string
	for n := r.IntN(5); n > 0; n-- {
		segs = append(segs, pick(randSegs))
	}
	path := "/" + strings.Join(segs, "/") + pick(randQueries)
	headers := map[string]string{":path": path, "x-rand": fmt.Sprint(r.Uint64())}
	body := pick(randBodies)
	if r.IntN(2) == 0 {
		headers["content-type"] = "application/json; charset=utf-8"
	}
	switch r.IntN(4) {
	case 0:
		headers["content-length"] = fmt.Sprint(len(body) + r.IntN(3))
	case 1:
		headers["content-length"] = "-1"
	}
	addr := func() *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address:       fmt.Sprintf("10.%d.%d.%d", r.IntN(256), r.IntN(256), r.IntN(256)),
			PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(r.IntN(65536))},
			Protocol:      corev3.SocketAddress_Protocol(r.IntN(2)),
			Ipv4Compat:    r.IntN(2) == 0,
		}}}
	}
	h := &authv3.AttributeContext_HttpRequest{
		Id:       fmt.Sprint(r.Int64()),
		Method:   pick(randMethods),
		Headers:  headers,
		Path:     path,
		Host:     "svc.ns.svc.cluster.local",
		Scheme:   "https",
		Size:     r.Int64N(math.MaxInt64) * int64(1-2*r.IntN(2)),
		Protocol: "HTTP/2",
		Body:     body,
	}
	if r.IntN(2) == 0 {
		h.RawBody = []byte(body + "\x00\xff")
	}
	if r.IntN(2) == 0 {
		h.HeaderMap = &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: "x-a", Value: "1"}, {Key: "x-b", RawValue: []byte{0, 1, 2, 250}},
		}}
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{
			Address:   addr(),
			Principal: "spiffe://cluster.local/ns/ns" + fmt.Sprint(r.IntN(3)) + "/sa/sa",
			Labels:    map[string]string{"app": "a", "version": fmt.Sprint(r.IntN(3))},
		},
		Destination: &authv3.AttributeContext_Peer{Address: addr(), Service: "svc"},
		Request: &authv3.AttributeContext_Request{
			Time: &timestamppb.Timestamp{Seconds: r.Int64N(maxTimestamp), Nanos: int32([]int{0, 1, 1000, 1000000, 123456789, 100000000}[r.IntN(6)])},
			Http: h,
		},
		ContextExtensions: map[string]string{"virtual_host": fmt.Sprint(r.IntN(10))},
		TlsSession:        &authv3.AttributeContext_TLSSession{Sni: "sni.example"},
	}}
	if withWKT && r.IntN(2) == 0 {
		st, err := structpb.NewStruct(map[string]any{"n": 1.25, "big": 1e300, "small": 1e-9, "s": "x", "l": []any{true, nil, 3.0}})
		if err != nil {
			panic(err)
		}
		a, err := anypb.New(wrapperspb.String("wrapped"))
		if err != nil {
			panic(err)
		}
		req.Attributes.MetadataContext = &corev3.Metadata{
			FilterMetadata:      map[string]*structpb.Struct{"envoy.filters.http.jwt_authn": st},
			TypedFilterMetadata: map[string]*anypb.Any{"typed": a},
		}
	}
	return req
}

// TestEnvoyInputValue: the input built straight from the proto is the very
// value the protojson→map→InterfaceToValue builder gives, over the example
// requests and random ones, and the two fail on the same inputs.
func TestEnvoyInputValue(t *testing.T) {
	reqs := sampleRequests(t)
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 2000; i++ {
		reqs = append(reqs, randomCheckRequest(r, i%4 == 0))
	}
	failed := 0
	for i, req := range reqs {
		path := strings.SplitN(req.GetAttributes().GetRequest().GetHttp().GetPath(), "?", 2)[0]
		want, wantErr := oldEnvoyInput(req, path)
		got, gotErr := envoyInputValue(req, path)
		if (wantErr != nil) != (gotErr != nil) {
			t.Fatalf("request %d: old error %v, new error %v\n%v", i, wantErr, gotErr, req)
		}
		if wantErr != nil {
			failed++
			continue
		}
		if want.Compare(got) != 0 {
			t.Fatalf("request %d: inputs differ\nold: %v\nnew: %v", i, want, got)
		}
	}
	if failed == len(reqs) || failed == 0 {
		t.Fatalf("%d of %d requests failed to build: the comparison needs both kinds", failed, len(reqs))
	}
}

// TestEnvoyInputValueEdges: values whose spelling the walk writes itself
// and that random requests seldom reach.
func TestEnvoyInputValueEdges(t *testing.T) {
	tss := []*timestamppb.Timestamp{
		{}, {Seconds: minTimestamp}, {Seconds: maxTimestamp, Nanos: 999999999},
		{Seconds: minTimestamp - 1}, {Seconds: maxTimestamp + 1}, {Nanos: -1}, {Nanos: 1e9},
		{Seconds: 1, Nanos: 10}, {Seconds: 1, Nanos: 10000}, {Seconds: 1, Nanos: 10000000},
	}
	for _, ts := range tss {
		req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Time: ts}}}
		want, wantErr := oldEnvoyInput(req, "/")
		got, gotErr := envoyInputValue(req, "/")
		if (wantErr != nil) != (gotErr != nil) || (wantErr == nil && want.Compare(got) != 0) {
			t.Errorf("%v: old %v (%v), new %v (%v)", ts, want, wantErr, got, gotErr)
		}
	}
	// An enum number the descriptor does not name, and invalid UTF-8,
	// which protojson refuses.
	for _, req := range []*authv3.CheckRequest{
		{Attributes: &authv3.AttributeContext{Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Protocol: 7}}}}}},
		{Attributes: &authv3.AttributeContext{Source: &authv3.AttributeContext_Peer{Principal: "a\xffb"}}},
		{Attributes: &authv3.AttributeContext{ContextExtensions: map[string]string{"k\xff": "v"}}},
	} {
		want, wantErr := oldEnvoyInput(req, "/")
		got, gotErr := envoyInputValue(req, "/")
		if (wantErr != nil) != (gotErr != nil) || (wantErr == nil && want.Compare(got) != 0) {
			t.Errorf("%v: old %v (%v), new %v (%v)", req, want, wantErr, got, gotErr)
		}
	}
}

// sampleRego is the sample policy the over-the-wire benchmark gives both
// trustmesh and the opa-envoy-plugin stand-in.
const sampleRego = `package envoy.authz

import input.attributes.request.http as http_request

default allow := false

source_principal := input.attributes.source.principal

allow if {
	http_request.method == "GET"
	input.parsed_path == ["healthz"]
}

allow if {
	startswith(source_principal, "spiffe://cluster.local/ns/frontend/sa/")
	http_request.method in {"GET", "HEAD"}
	path_has_prefix(["api", "v1", "catalog"])
}

allow if {
	source_principal == "spiffe://cluster.local/ns/payments/sa/payments"
	http_request.method in {"PUT", "PATCH"}
	path_has_prefix(["api", "v1", "orders"])
	count(input.parsed_path) == 5
	input.parsed_path[4] == "status"
}

path_has_prefix(prefix) if {
	count(input.parsed_path) >= count(prefix)
	array.slice(input.parsed_path, 0, count(prefix)) == prefix
}
`

func sampleProvider(tb testing.TB) *provider {
	tb.Helper()
	p, err := compileRego(tb, sampleRego).provider(context.Background(), "rego:envoy/authz/allow")
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func catalogRequest() *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{
			Address:   &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40001}}}},
			Principal: "spiffe://cluster.local/ns/frontend/sa/web",
		},
		Destination: &authv3.AttributeContext_Peer{
			Address:   &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080}}}},
			Principal: "spiffe://cluster.local/ns/catalog/sa/catalog-api",
		},
		Request: &authv3.AttributeContext_Request{
			Time: timestamppb.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)),
			Http: &authv3.AttributeContext_HttpRequest{
				Id: "1001", Method: "GET",
				Headers: map[string]string{
					":authority": "catalog.catalog.svc.cluster.local", ":method": "GET",
					":path": "/api/v1/catalog/items?limit=10", ":scheme": "http",
					"user-agent": "bench-client/1.0", "x-request-id": "00000000-0000-4000-8000-000000000001",
					"x-forwarded-proto": "http", "accept": "application/json",
				},
				Path: "/api/v1/catalog/items?limit=10", Host: "catalog.catalog.svc.cluster.local",
				Scheme: "http", Protocol: "HTTP/1.1",
			},
		},
		ContextExtensions: map[string]string{"virtual_host": "catalog"},
	}}
}

// TestProviderEvalRequest: the provider decides the same through either
// input, and allows the sample request.
func TestProviderEvalRequest(t *testing.T) {
	p := sampleProvider(t)
	ctx := context.Background()
	req := catalogRequest()
	res, err := p.evalRequest(ctx, req, "/api/v1/catalog/items", time.Second)
	if err != nil || !res.Allowed {
		t.Fatalf("evalRequest: %+v, %v; want allowed", res, err)
	}
	req.Attributes.Source.Principal = "spiffe://cluster.local/ns/other/sa/web"
	res, err = p.evalRequest(ctx, req, "/api/v1/catalog/items", time.Second)
	if err != nil || res.Allowed {
		t.Fatalf("evalRequest: %+v, %v; want denied", res, err)
	}
}

// BenchmarkProviderInput compares the ways of building the input and
// evaluating the sample Rego: protojson→map→InterfaceToValue (old),
// straight from the proto (whole), and straight from the proto reduced to
// what the policy reads (new, evalRequest).
func BenchmarkProviderInput(b *testing.B) {
	p := sampleProvider(b)
	ctx := context.Background()
	req := catalogRequest()
	const path = "/api/v1/catalog/items"
	b.Run("build/old", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := oldEnvoyInput(req, path); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("build/new", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := envoyInputValue(req, path); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("eval/old", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			v, err := oldEnvoyInput(req, path)
			if err != nil {
				b.Fatal(err)
			}
			if res, err := p.eval(ctx, v, time.Second); err != nil || !res.Allowed {
				b.Fatal(res, err)
			}
		}
	})
	b.Run("eval/whole", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			v, err := envoyInputValue(req, path)
			if err != nil {
				b.Fatal(err)
			}
			if res, err := p.eval(ctx, v, time.Second); err != nil || !res.Allowed {
				b.Fatal(res, err)
			}
		}
	})
	b.Run("eval/new", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if res, err := p.evalRequest(ctx, req, path, time.Second); err != nil || !res.Allowed {
				b.Fatal(res, err)
			}
		}
	})
}
