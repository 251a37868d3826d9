package sds

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	own = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
)

type fixture struct {
	auth   *testca.Authority
	store  *identity.Store
	client secretv3.SecretDiscoveryServiceClient
}

// newFixture serves SDS from a fresh store on a unix socket.
func newFixture(t *testing.T) *fixture {
	t.Helper()
	auth := testca.New(t, td, time.Now())
	f := &fixture{auth: auth, store: identity.New()}
	srv, err := New(Config{Source: f.store})
	if err != nil {
		t.Fatal(err)
	}
	f.client = serve(t, srv)
	return f
}

func serve(t *testing.T, srv *Server) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	g := grpc.NewServer()
	srv.Register(g)
	path := testca.ServeUnix(t, g)
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

func (f *fixture) rotate(t *testing.T) *x509svid.SVID {
	t.Helper()
	s := f.auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
	f.store.SetSVID(s)
	return s
}

var node = &core.Node{Id: "sidecar~10.0.0.1~cart-7d9f.shop~shop.svc.cluster.local", Cluster: "cart.shop"}

// secrets decodes a response's resources by name.
func secrets(t *testing.T, resources []*anypb.Any) map[string]*tlsv3.Secret {
	t.Helper()
	out := map[string]*tlsv3.Secret{}
	for _, r := range resources {
		if r.GetTypeUrl() != resourcev3.SecretType {
			t.Fatalf("resource of type %s", r.GetTypeUrl())
		}
		var s tlsv3.Secret
		if err := r.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		out[s.GetName()] = &s
	}
	return out
}

// checkDefault checks that the secret holds s's chain and matching key,
// usable as an Envoy/Go TLS certificate.
func checkDefault(t *testing.T, secret *tlsv3.Secret, s *x509svid.SVID) {
	t.Helper()
	tc := secret.GetTlsCertificate()
	pair, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		t.Fatalf("default secret is not a usable key pair: %v", err)
	}
	if len(pair.Certificate) != len(s.Certificates) {
		t.Fatalf("default chain has %d certificates, want %d", len(pair.Certificate), len(s.Certificates))
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if !leaf.Equal(s.Certificates[0]) {
		t.Fatalf("default secret holds serial %s, want %s", leaf.SerialNumber, s.Certificates[0].SerialNumber)
	}
	if !pair.PrivateKey.(crypto.Signer).Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey) {
		t.Fatal("default key does not match its certificate")
	}
}

func checkRootCA(t *testing.T, secret *tlsv3.Secret, roots ...*x509.Certificate) {
	t.Helper()
	rest := secret.GetValidationContext().GetTrustedCa().GetInlineBytes()
	var got []*x509.Certificate
	for {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, c)
	}
	if len(got) != len(roots) {
		t.Fatalf("ROOTCA holds %d roots, want %d", len(got), len(roots))
	}
	for i := range roots {
		if !got[i].Equal(roots[i]) {
			t.Fatalf("ROOTCA root %d differs", i)
		}
	}
}

func TestStateOfTheWorld(t *testing.T) {
	f := newFixture(t)
	first := f.rotate(t)
	f.store.SetBundle(f.auth.Bundle())

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := f.client.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{CertificateName, RootCAName}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names}); err != nil {
		t.Fatal(err)
	}
	// Receive and ACK, as Envoy does, until both secrets have arrived (the
	// cache may hold one before the other).
	got := map[string]*tlsv3.Secret{}
	var resp *discoveryv3.DiscoveryResponse
	for len(got) < 2 {
		resp, err = stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for name, secret := range secrets(t, resp.GetResources()) {
			got[name] = secret
		}
		ack := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
		if err := stream.Send(ack); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != 2 || got[CertificateName] == nil || got[RootCAName] == nil {
		t.Fatalf("responses hold %v, want default and ROOTCA", keys(got))
	}
	checkDefault(t, got[CertificateName], first)
	checkRootCA(t, got[RootCAName], f.auth.Root)

	second := f.rotate(t)
	resp2, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp2.GetVersionInfo() == resp.GetVersionInfo() {
		t.Fatal("rotation pushed with the same version")
	}
	got = secrets(t, resp2.GetResources())
	if got[CertificateName] == nil {
		t.Fatalf("rotation pushed %v, want default", keys(got))
	}
	checkDefault(t, got[CertificateName], second)
}

func TestDelta(t *testing.T) {
	f := newFixture(t)
	f.store.SetBundle(f.auth.Bundle())
	first := f.rotate(t)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := f.client.DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType,
		ResourceNamesSubscribe: []string{CertificateName, RootCAName}}); err != nil {
		t.Fatal(err)
	}
	got := map[string]*tlsv3.Secret{}
	for len(got) < 2 {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range resp.GetResources() {
			for name, s := range secrets(t, []*anypb.Any{r.GetResource()}) {
				if r.GetName() != name || r.GetVersion() == "" {
					t.Fatalf("delta resource %q (version %q) carries secret %q", r.GetName(), r.GetVersion(), name)
				}
				got[name] = s
			}
		}
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResponseNonce: resp.GetNonce()}); err != nil {
			t.Fatal(err)
		}
	}
	checkDefault(t, got[CertificateName], first)
	checkRootCA(t, got[RootCAName], f.auth.Root)

	// A new root arrives before anything is signed under it, then the
	// certificate rotates: each is pushed as it happens.
	next := testca.New(t, td, time.Now())
	bundle := f.auth.Bundle()
	bundle.AddX509Authority(next.Root)
	f.store.SetBundle(bundle)
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got = secrets(t, []*anypb.Any{resp.GetResources()[0].GetResource()})
	if len(resp.GetResources()) != 1 || got[RootCAName] == nil {
		t.Fatalf("bundle change pushed %d resources, want only ROOTCA", len(resp.GetResources()))
	}
	checkRootCA(t, got[RootCAName], f.auth.Root, next.Root)

	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	second := f.rotate(t)
	resp, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetResources()) != 1 || resp.GetResources()[0].GetName() != CertificateName {
		t.Fatalf("rotation pushed %d resources, want only default", len(resp.GetResources()))
	}
	checkDefault(t, secrets(t, []*anypb.Any{resp.GetResources()[0].GetResource()})[CertificateName], second)
}

func keys(m map[string]*tlsv3.Secret) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// caller is one caller's view, over its store, that can be made to fail as
// the node agent's does once the caller's process is gone.
type caller struct {
	store *identity.Store
	gone  chan struct{}
}

func (c *caller) View(ctx context.Context) (identity.View, <-chan struct{}, error) {
	select {
	case <-c.gone:
		return identity.View{}, nil, status.Error(codes.PermissionDenied, "the caller's process is gone")
	default:
	}
	snap, ch := c.store.Load()
	changed := make(chan struct{})
	go func() {
		defer close(changed)
		select {
		case <-ctx.Done():
		case <-ch:
		case <-c.gone:
		}
	}()
	return identity.NewView([]*x509svid.SVID{snap.SVID}, snap.Bundle), changed, nil
}

// TestEachCallerGetsItsOwnSecrets serves two callers, told apart by the
// stream's metadata as the node agent tells them apart by attestation: each
// gets its own default, a rotation reaches only its owner, and a caller
// whose view fails loses its stream with the view's error.
func TestEachCallerGetsItsOwnSecrets(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/api")
	callers := map[string]*caller{}
	svids := map[string]*x509svid.SVID{}
	for name, id := range map[string]spiffeid.ID{"a": own, "b": other} {
		c := &caller{store: identity.New(), gone: make(chan struct{})}
		c.store.SetBundle(auth.Bundle())
		svids[name] = auth.SVID(t, id, time.Now().Add(-time.Minute), time.Hour)
		c.store.SetSVID(svids[name])
		callers[name] = c
	}
	srv, err := New(Config{Resolve: func(ctx context.Context) (identity.Viewer, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		if v := md.Get("caller"); len(v) == 1 && callers[v[0]] != nil {
			return callers[v[0]], nil
		}
		return nil, status.Error(codes.PermissionDenied, "no identity for this caller")
	}})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	names := []string{CertificateName, RootCAName}
	open := func(name string) (secretv3.SecretDiscoveryService_StreamSecretsClient, map[string]*tlsv3.Secret) {
		stream, err := client.StreamSecrets(metadata.AppendToOutgoingContext(ctx, "caller", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names}); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		ack := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResourceNames: names,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
		if err := stream.Send(ack); err != nil {
			t.Fatal(err)
		}
		return stream, secrets(t, resp.GetResources())
	}
	streamA, gotA := open("a")
	streamB, gotB := open("b")
	checkDefault(t, gotA[CertificateName], svids["a"])
	checkDefault(t, gotB[CertificateName], svids["b"])
	checkRootCA(t, gotA[RootCAName], auth.Root)
	checkRootCA(t, gotB[RootCAName], auth.Root)

	type received struct {
		resp *discoveryv3.DiscoveryResponse
		err  error
	}
	recv := func(s secretv3.SecretDiscoveryService_StreamSecretsClient) chan received {
		ch := make(chan received, 1)
		go func() {
			resp, err := s.Recv()
			ch <- received{resp, err}
		}()
		return ch
	}
	fromA, fromB := recv(streamA), recv(streamB)
	svids["a"] = auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
	callers["a"].store.SetSVID(svids["a"])
	r := <-fromA
	if r.err != nil {
		t.Fatalf("rotation not pushed to its owner: %v", r.err)
	}
	checkDefault(t, secrets(t, r.resp.GetResources())[CertificateName], svids["a"])
	select {
	case r := <-fromB:
		t.Fatalf("another caller's rotation reached b: %v %v", r.resp, r.err)
	case <-time.After(300 * time.Millisecond):
	}

	close(callers["b"].gone)
	if r := <-fromB; status.Code(r.err) != codes.PermissionDenied {
		t.Fatalf("stream of a gone caller ended with %v, want PermissionDenied", r.err)
	}
	stranger, err := client.StreamSecrets(metadata.AppendToOutgoingContext(ctx, "caller", "c"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stranger.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stream of an unknown caller: %v, want PermissionDenied", err)
	}
}

// several is a caller's view over a changeable list of stores.
type several struct {
	mu      sync.Mutex
	stores  []*identity.Store
	changed chan struct{}
}

func (v *several) set(stores ...*identity.Store) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.stores = stores
	close(v.changed)
	v.changed = make(chan struct{})
}

func (v *several) View(ctx context.Context) (identity.View, <-chan struct{}, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	var svids []*x509svid.SVID
	var snap identity.Snapshot
	chans := []<-chan struct{}{v.changed}
	for _, st := range v.stores {
		var ch <-chan struct{}
		snap, ch = st.Load()
		svids = append(svids, snap.SVID)
		chans = append(chans, ch)
	}
	changed := make(chan struct{})
	var once sync.Once
	for _, ch := range chans {
		go func() {
			select {
			case <-ctx.Done():
			case <-ch:
			case <-changed:
				return
			}
			once.Do(func() { close(changed) })
		}()
	}
	return identity.NewView(svids, snap.Bundle), changed, nil
}

// TestEveryIdentityUnderItsSPIFFEID: a caller with several identities gets
// each under its SPIFFE ID, "default" the first by ID; a rotation pushes
// only its own secret, and an identity the caller loses is removed.
func TestEveryIdentityUnderItsSPIFFEID(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	api := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/api")
	stores := map[spiffeid.ID]*identity.Store{}
	svids := map[spiffeid.ID]*x509svid.SVID{}
	for _, id := range []spiffeid.ID{own, api} {
		stores[id] = identity.New()
		stores[id].SetBundle(auth.Bundle())
		svids[id] = auth.SVID(t, id, time.Now().Add(-time.Minute), time.Hour)
		stores[id].SetSVID(svids[id])
	}
	v := &several{changed: make(chan struct{})}
	v.set(stores[own], stores[api])
	srv, err := New(Config{Resolve: func(context.Context) (identity.Viewer, error) { return v, nil }})
	if err != nil {
		t.Fatal(err)
	}
	client := serve(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := client.DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType,
		ResourceNamesSubscribe: []string{CertificateName, RootCAName, own.String(), api.String()}}); err != nil {
		t.Fatal(err)
	}
	recv := func() (map[string]*tlsv3.Secret, []string) {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]*tlsv3.Secret{}
		for _, r := range resp.GetResources() {
			for name, s := range secrets(t, []*anypb.Any{r.GetResource()}) {
				got[name] = s
			}
		}
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resourcev3.SecretType, ResponseNonce: resp.GetNonce()}); err != nil {
			t.Fatal(err)
		}
		return got, resp.GetRemovedResources()
	}
	got := map[string]*tlsv3.Secret{}
	for len(got) < 4 {
		more, _ := recv()
		for name, s := range more {
			got[name] = s
		}
	}
	checkDefault(t, got[CertificateName], svids[api]) // api sorts before cart
	checkDefault(t, got[api.String()], svids[api])
	checkDefault(t, got[own.String()], svids[own])
	checkRootCA(t, got[RootCAName], auth.Root)

	svids[own] = auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
	stores[own].SetSVID(svids[own])
	got, _ = recv()
	if len(got) != 1 || got[own.String()] == nil {
		t.Fatalf("rotation of %s pushed %v, want only its own secret", own, keys(got))
	}
	checkDefault(t, got[own.String()], svids[own])

	v.set(stores[own])
	got, removed := recv()
	if len(got) != 1 || got[CertificateName] == nil || len(removed) != 1 || removed[0] != api.String() {
		t.Fatalf("losing %s pushed %v and removed %v, want default updated and %s removed", api, keys(got), removed, api)
	}
	checkDefault(t, got[CertificateName], svids[own])
}
