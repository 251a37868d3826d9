package adversary

import (
	"context"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// check is one ext_authz Check, as an Envoy in front of the destination
// would send it for a client's request.
type check struct {
	dst     string // destination namespace: spiffe://cluster.local/ns/<dst>/sa/app
	dstID   string // overrides dst with a whole principal
	src     string // source principal; "" is a client without a peer identity
	srcIP   string // the connection's peer address; default 192.0.2.10
	dstIP   string // default 10.0.1.1, port 8080
	host    string // default app.example.com
	path    string // default /
	headers map[string]string
	sni     string
}

func (c check) request() *authv3.CheckRequest {
	or := func(v, def string) string {
		if v == "" {
			return def
		}
		return v
	}
	dst := or(c.dstID, td+"/ns/"+c.dst+"/sa/app")
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	headers := map[string]string{":authority": or(c.host, "app.example.com"), ":method": "GET", ":path": or(c.path, "/")}
	for k, v := range c.headers {
		headers[k] = v
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: c.src, Address: addr(or(c.srcIP, "192.0.2.10"), 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: dst, Address: addr(or(c.dstIP, "10.0.1.1"), 8080)},
		TlsSession:  tlsSession(c.sni),
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: or(c.path, "/"), Host: or(c.host, "app.example.com"), Scheme: "http", Protocol: "HTTP/1.1",
			Headers: headers,
		}},
	}}
}

func tlsSession(sni string) *authv3.AttributeContext_TLSSession {
	if sni == "" {
		return nil
	}
	return &authv3.AttributeContext_TLSSession{Sni: sni}
}

var (
	authzMu      sync.Mutex
	authzClients = map[*server]authv3.AuthorizationClient{}
)

// authzClient calls the server's ext_authz port as an Envoy does: over
// mTLS with a workload certificate from the CA.
func (s *server) authzClient(t *testing.T) authv3.AuthorizationClient {
	t.Helper()
	authzMu.Lock()
	defer authzMu.Unlock()
	if c, ok := authzClients[s]; ok {
		return c
	}
	envoy := s.enrol(t, webID)
	// The connection lives as long as the server: a shared server outlives
	// the test that dialled it.
	conn, err := grpc.NewClient(s.authz, grpc.WithTransportCredentials(credentialsFor(s, envoy)))
	if err != nil {
		t.Fatal(err)
	}
	s.onStop(func() { conn.Close() })
	c := authv3.NewAuthorizationClient(conn)
	authzClients[s] = c
	return c
}

// decide sends c and returns the decision's code: OK or PermissionDenied.
func (s *server) decide(t *testing.T, c check) codes.Code {
	t.Helper()
	client := s.authzClient(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := client.Check(ctx, c.request(), grpc.WaitForReady(true))
		cancel()
		if err == nil {
			return codes.Code(resp.GetStatus().GetCode())
		}
		// The authz port opens once the policies are loaded.
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			t.Fatalf("Check: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// decisionCase is one attack through ext_authz and the decision trustmesh
// must reach.
type decisionCase struct {
	name string
	c    check
	want codes.Code
}

func runDecisions(t *testing.T, s *server, cases []decisionCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := s.decide(t, tc.c); got != tc.want {
				t.Errorf("decision %s, want %s", got, tc.want)
			}
		})
	}
}

const (
	allow = codes.OK
	deny  = codes.PermissionDenied
)

// TestIPv6AddressRules: the IPv6 and IPv4-mapped spellings of an address
// never escape an address rule (ipBlocks, remoteIpBlocks, source.ip,
// destination.ip conditions, hosts with IPv6 literals). Forwarded
// addresses are in TestClientSetRemoteAddress.
func TestIPv6AddressRules(t *testing.T) {
	s := shared(t)
	peer := func(ns, ip string) check { return check{dst: ns, src: webID, srcIP: ip} }
	runDecisions(t, s, []decisionCase{
		{"ipBlocks: control, outside the blocks", peer("v6-ip", "2001:db8:2::1"), allow},
		{"ipBlocks: fd00::1", peer("v6-ip", "fd00::1"), deny},
		{"ipBlocks: upper case", peer("v6-ip", "FD00::1"), deny},
		{"ipBlocks: fully expanded", peer("v6-ip", "fd00:0000:0000:0000:0000:0000:0000:0001"), deny},
		{"ipBlocks: IPv4-mapped IPv6 of a blocked IPv4", peer("v6-ip", "::ffff:10.1.2.3"), deny},
		{"ipBlocks: IPv4-mapped in hex", peer("v6-ip", "::ffff:a01:203"), deny},
		{"ipBlocks: inside a /48", peer("v6-ip", "2001:db8:1:ffff::1"), deny},
		{"ipBlocks ALLOW: control, inside", peer("v6-allow", "fd00:1:2::3"), allow},
		{"ipBlocks ALLOW: just outside", peer("v6-allow", "fd00:2::1"), deny},
		{"ipBlocks ALLOW: IPv4 peer", peer("v6-allow", "10.0.0.1"), deny},
		{"remoteIpBlocks: peer address with no forwarded address", peer("v6-remote", "2001:db8::9"), deny},
		{"source.ip condition", peer("v6-when", "fd00::2"), deny},
		{"destination.ip condition", check{dst: "v6-when", src: webID, dstIP: "fd01::5"}, deny},
		{"destination.ip condition, IPv4-mapped is not fd01::/16", check{dst: "v6-when", src: webID, dstIP: "::ffff:10.0.0.5"}, allow},
		{"hosts: [::1]", check{dst: "v6-host", src: webID, host: "[::1]"}, deny},
		{"hosts: [fd00::1]:8080", check{dst: "v6-host", src: webID, host: "[fd00::1]:8080"}, deny},
		{"hosts: upper case IPv6 literal", check{dst: "v6-host", src: webID, host: "[FD00::1]:8080"}, deny},
		{"hosts: control, another literal", check{dst: "v6-host", src: webID, host: "[fd00::2]:8080"}, allow},
	})
}

// TestPathForms: the spellings Envoy normalizes to a denied path (or
// rejects) are denied too.
func TestPathForms(t *testing.T) {
	s := shared(t)
	path := func(p string) check { return check{dst: "paths", src: webID, path: p} }
	runDecisions(t, s, []decisionCase{
		{"control: another path", path("/public"), allow},
		{"control: a longer name", path("/administrator"), allow},
		{"exact", path("/admin"), deny},
		{"double slash", path("//admin"), deny},
		{"dot segment", path("/./admin"), deny},
		{"dot-dot segment", path("/x/../admin/users"), deny},
		{"encoded dots", path("/x/%2e%2e/admin"), deny},
		{"encoded letter", path("/%61dmin"), deny},
		{"encoded slash", path("/admin%2Fusers"), deny},
		{"encoded backslash", path("/x/..%5Cadmin"), deny},
		{"raw backslash", path("/x\\..\\admin"), deny},
		{"NUL byte", path("/admin%00"), deny},
		{"query string", path("/admin?x=/public"), deny},
		{"fragment", path("/admin#/public"), deny},
		{"trailing slash", path("/admin/"), deny},
	})
}
