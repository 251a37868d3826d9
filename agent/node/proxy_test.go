package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
)

func TestValidateProxy(t *testing.T) {
	bundle := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(bundle, testca.New(t, td, time.Now()).RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	base := Config{NodeName: "node-a", CAAddress: "ca:15012", CABundleFile: bundle, TokenFile: "/var/run/secrets/tokens/istio-ca"}
	ok := base
	ok.Proxy, ok.AuthzAddress, ok.NodeIP = true, "trustmesh:9191", "10.0.0.7"
	s, err := validate(ok)
	if err != nil {
		t.Fatalf("valid proxy config refused: %v", err)
	}
	if s.XDSAddress != "ca:15012" {
		t.Fatalf("xDS address defaults to %q, want the CA's", s.XDSAddress)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"proxy without ext_authz", func(c *Config) { c.Proxy, c.NodeIP = true, "10.0.0.7" }, "needs the ext_authz address"},
		{"proxy without node IP", func(c *Config) { c.Proxy, c.AuthzAddress = true, "a:1" }, "needs this node's IP"},
		{"proxy with a bad node IP", func(c *Config) { c.Proxy, c.AuthzAddress, c.NodeIP = true, "a:1", "node-a" }, "needs this node's IP"},
		{"bad ext_authz address", func(c *Config) { c.Proxy, c.AuthzAddress = true, "trustmesh" }, "ext_authz address"},
		{"bad xDS address", func(c *Config) { c.Proxy, c.AuthzAddress, c.XDSAddress = true, "a:1", "xds" }, "xDS address"},
		{"addresses without proxy", func(c *Config) { c.AuthzAddress = "a:1" }, "need --proxy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.mod(&c)
			if err := Validate(c); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want an error with %q", err, tc.want)
			}
		})
	}
}
