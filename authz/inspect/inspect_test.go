package inspect

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/source"
)

const request = `{"attributes": {
  "source": {"principal": "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"},
  "destination": {"principal": "spiffe://cluster.local/ns/bookinfo/sa/productpage", "labels": {"app": "productpage"}},
  "request": {"http": {"method": "GET", "host": "productpage", "path": "PATH", "headers": {"x-user": "USER"}}}}}`

// TestCheck runs the shipped examples as `trustmesh policy check` does.
func TestCheck(t *testing.T) {
	cfg := Config{PolicyDir: "../../examples/policies"}
	tests := []struct {
		name, path, user string
		cfg              Config
		allowed          bool
		policy           string
		badIn            bool
	}{
		{"allowed by the ALLOW policy", "/productpage", "alice", withBundle(cfg), true, "bookinfo/productpage-viewer", false},
		{"denied by the DENY policy", "/static/../admin", "alice", withBundle(cfg), false, "bookinfo/deny-admin", false},
		{"denied by the CUSTOM bundle", "/productpage", "mallory", withBundle(cfg), false, "istio-system/ext-authz", false},
		{"no ALLOW policy matched", "/reviews", "alice", withBundle(cfg), false, "", false},
		{"unknown provider without the bundle", "/productpage", "alice", cfg, false, "", true},
		{"no policy dir", "/", "alice", Config{}, false, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			err := Check(context.Background(), tt.cfg, []byte(strings.NewReplacer("PATH", tt.path, "USER", tt.user).Replace(request)), &out)
			if tt.badIn {
				if !errors.Is(err, ErrBadInput) {
					t.Fatalf("error %v, want ErrBadInput", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got struct {
				Allowed *bool  `json:"allowed"`
				Policy  string `json:"policy"`
				Reason  string `json:"reason"`
			}
			if err := json.Unmarshal(out.Bytes(), &got); err != nil {
				t.Fatalf("output is not one JSON object: %v\n%s", err, out.String())
			}
			if got.Allowed == nil || *got.Allowed != tt.allowed || got.Policy != tt.policy || got.Reason == "" {
				t.Fatalf("output %s", out.String())
			}
		})
	}
}

func TestCheckBadRequest(t *testing.T) {
	err := Check(context.Background(), withBundle(Config{PolicyDir: "../../examples/policies"}), []byte(`{"attributes": {"nope": 1}}`), &bytes.Buffer{})
	if !errors.Is(err, ErrBadInput) {
		t.Fatalf("error %v, want ErrBadInput", err)
	}
}

func TestCompile(t *testing.T) {
	var out bytes.Buffer
	if err := Compile(context.Background(), withBundle(Config{PolicyDir: "../../examples/policies"}), &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"package trustmesh.authz", "bookinfo/deny-admin (DENY)", `input["request.path"] == "/admin"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("compile output lacks %q", want)
		}
	}
}

func withBundle(c Config) Config {
	c.Bundles = append(c.Bundles, source.BundleConfig{Path: "../../policies/envoy"})
	return c
}
