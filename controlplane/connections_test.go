package controlplane_test

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
)

// TestListenersBoundConnections: the CA (gRPC) port, the monitoring port
// and the public SPIFFE bundle endpoint close idle and silent connections,
// and serve no more than the cap at once, as configured.
func TestListenersBoundConnections(t *testing.T) {
	ports := func(e *env) map[string]connlimittest.Exchange {
		tlsCfg := &tls.Config{RootCAs: rootPool(e), ServerName: "localhost", Time: e.clock.Now}
		a := e.cp.Addrs()
		return map[string]connlimittest.Exchange{
			a.CA.String():         connlimittest.GRPC(tlsCfg),
			a.Monitoring.String(): connlimittest.HTTP(nil, "/healthz"),
			a.Bundle.String():     connlimittest.HTTP(tlsCfg, "/"),
		}
	}
	t.Run("idle", func(t *testing.T) {
		e := start(t, func(c *controlplane.Config) {
			c.Listen.Bundle = "127.0.0.1:0"
			c.Listen.Connections = connlimit.Config{IdleTimeout: 300 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond}
		})
		for addr, ex := range ports(e) {
			connlimittest.ClosesIdle(t, addr, ex, 5*time.Second)
			connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
		}
	})
	t.Run("cap", func(t *testing.T) {
		e := start(t, func(c *controlplane.Config) {
			c.Listen.Bundle = "127.0.0.1:0"
			c.Listen.Connections = connlimit.Config{MaxConnections: 8}
		})
		for addr, ex := range ports(e) {
			connlimittest.CapHolds(t, addr, 8, ex)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		if err := (controlplane.Config{Listen: controlplane.ListenConfig{Connections: connlimit.Config{MaxConnections: -1}}}).Validate(); err == nil {
			t.Fatal("Validate accepted a negative connection cap")
		}
	})
}
