package webhook_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/injector/webhook"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
)

// TestServerBoundsConnections: the webhook port closes idle connections
// and serves no more than its cap at once.
func TestServerBoundsConnections(t *testing.T) {
	cert := selfSigned(t)
	serve := func(t *testing.T, limits connlimit.Config) string {
		srv, err := webhook.New(webhook.Config{
			Address: "127.0.0.1:0", Handler: http.NotFoundHandler(), Connections: limits,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
		})
		if err != nil {
			t.Fatal(err)
		}
		run(t, "webhook server", srv.Run)
		return srv.Addr().String()
	}
	// The test trusts whatever certificate the server shows: it checks
	// connections, not identities.
	client := &tls.Config{InsecureSkipVerify: true}
	t.Run("idle", func(t *testing.T) {
		addr := serve(t, connlimit.Config{IdleTimeout: 300 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond})
		connlimittest.ClosesIdle(t, addr, connlimittest.HTTP(client, "/"), 5*time.Second)
		connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
	})
	t.Run("cap", func(t *testing.T) {
		connlimittest.CapHolds(t, serve(t, connlimit.Config{MaxConnections: 8}), 8, connlimittest.HTTP(client, "/"))
	})
}

// TestServerServesAHandedListener: a server given a bound listener serves
// on it and binds nothing itself, so a caller that held the port since its
// start leaves no moment in which another process could take it. Address
// here names a port in use, which binding would fail on.
func TestServerServesAHandedListener(t *testing.T) {
	cert := selfSigned(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	lis, err := connlimit.Config{}.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := webhook.New(webhook.Config{
		Address: taken.Addr().String(), Listener: lis, Handler: http.NotFoundHandler(),
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
	})
	if err != nil {
		t.Fatalf("New with a listener: %v", err)
	}
	if srv.Addr() != lis.Addr() {
		t.Fatalf("Addr = %v, want the handed listener's %v", srv.Addr(), lis.Addr())
	}
	run(t, "webhook server", srv.Run)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + lis.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET / on the handed listener = %d, want the handler's 404", resp.StatusCode)
	}
}

func selfSigned(t *testing.T) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "webhook"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
