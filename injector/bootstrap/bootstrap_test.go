package bootstrap_test

import (
	"errors"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/injector/bootstrap"
)

func config() bootstrap.Config {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	return bootstrap.Config{
		Type:          bootstrap.Sidecar,
		XDSAddress:    "trustmesh.trustmesh-system.svc:15012",
		XDSServerID:   spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh"),
		SDSSocket:     "/run/trustmesh/agent.sock",
		AdminPort:     15000,
		ReadinessPort: 15021,
		ClusterDomain: "cluster.local",
		TrustDomain:   td,
		Labels:        map[string]string{"app": "orders", "version": "v2"},
	}
}

// TestRoundTrip parses the rendered JSON back, as Envoy would, and checks
// what the mesh's security rests on.
func TestRoundTrip(t *testing.T) {
	for _, typ := range []bootstrap.NodeType{bootstrap.Sidecar, bootstrap.Router} {
		t.Run(string(typ), func(t *testing.T) {
			cfg := config()
			cfg.Type = typ
			b, err := bootstrap.Build(cfg)
			if err != nil {
				t.Fatal(err)
			}
			text, err := bootstrap.JSON(b)
			if err != nil {
				t.Fatal(err)
			}
			again, err := bootstrap.JSON(b)
			if err != nil || again != text {
				t.Fatal("JSON is not deterministic")
			}
			var parsed bootstrapv3.Bootstrap
			if err := protojson.Unmarshal([]byte(text), &parsed); err != nil {
				t.Fatal(err)
			}
			if err := parsed.ValidateAll(); err != nil {
				t.Fatal(err)
			}
			if want := string(typ) + "~$(INSTANCE_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.cluster.local"; parsed.Node.Id != want {
				t.Errorf("node id %q, want %q", parsed.Node.Id, want)
			}
			labels := parsed.Node.Metadata.Fields[bootstrap.MetaLabels].GetStructValue().AsMap()
			if labels["app"] != "orders" || labels["version"] != "v2" {
				t.Errorf("labels %v", labels)
			}
			if a := parsed.Admin.Address.GetSocketAddress(); a.Address != "127.0.0.1" {
				t.Errorf("admin listens on %s, not localhost", a.Address)
			}
			var xds *tlsv3.UpstreamTlsContext
			for _, c := range parsed.StaticResources.Clusters {
				if c.Name == bootstrap.ClusterXDS {
					xds = &tlsv3.UpstreamTlsContext{}
					if err := c.TransportSocket.GetTypedConfig().UnmarshalTo(xds); err != nil {
						t.Fatal(err)
					}
				}
			}
			if xds == nil {
				t.Fatal("no xDS cluster")
			}
			cc := xds.CommonTlsContext
			if cc.TlsCertificateSdsSecretConfigs[0].Name != bootstrap.SecretCertificate {
				t.Error("xDS client certificate is not the agent's default secret")
			}
			vc := cc.GetCombinedValidationContext()
			if vc.ValidationContextSdsSecretConfig.Name != bootstrap.SecretRoots {
				t.Error("xDS server is not validated against ROOTCA")
			}
			sans := vc.DefaultValidationContext.MatchTypedSubjectAltNames
			if len(sans) != 1 || sans[0].SanType != tlsv3.SubjectAltNameMatcher_URI ||
				sans[0].Matcher.GetExact() != cfg.XDSServerID.String() {
				t.Errorf("xDS server SAN matcher %v, want exactly %s", sans, cfg.XDSServerID)
			}
			if xds.Sni != "trustmesh.trustmesh-system.svc" {
				t.Errorf("SNI %q", xds.Sni)
			}
		})
	}
}

func TestInvalidConfig(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*bootstrap.Config)
		want   string
	}{
		{"node type", func(c *bootstrap.Config) { c.Type = "waypoint" }, "node type"},
		{"no port", func(c *bootstrap.Config) { c.XDSAddress = "trustmesh" }, "xDS address"},
		{"port zero", func(c *bootstrap.Config) { c.XDSAddress = "trustmesh:0" }, "xDS address"},
		{"no server ID", func(c *bootstrap.Config) { c.XDSServerID = spiffeid.ID{} }, "SPIFFE ID"},
		{"no socket", func(c *bootstrap.Config) { c.SDSSocket = "" }, "socket"},
		{"admin port", func(c *bootstrap.Config) { c.AdminPort = 0 }, "admin port"},
		{"no cluster domain", func(c *bootstrap.Config) { c.ClusterDomain = "" }, "cluster domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config()
			tc.mutate(&cfg)
			_, err := bootstrap.Build(cfg)
			if err == nil || errors.Unwrap(err) == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one about %s", err, tc.want)
			}
		})
	}
}
