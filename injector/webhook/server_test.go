package webhook_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
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
