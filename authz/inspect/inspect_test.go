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

// TestCheckBatch decides many requests from one load, as JSON lines or as
// one JSON array, one decision per output line in input order.
func TestCheckBatch(t *testing.T) {
	cfg := withBundle(Config{PolicyDir: "../../examples/policies"})
	cases := []struct {
		path, user string
		allowed    bool
		policy     string
	}{
		{"/productpage", "alice", true, "bookinfo/productpage-viewer"},
		{"/static/../admin", "alice", false, "bookinfo/deny-admin"},
		{"/productpage", "mallory", false, "istio-system/ext-authz"},
		{"/reviews", "alice", false, ""},
	}
	reqs := make([]string, len(cases))
	for i, c := range cases {
		reqs[i] = strings.NewReplacer("PATH", c.path, "USER", c.user, "\n", " ").Replace(request)
	}
	inputs := map[string]string{
		"JSON lines":        strings.Join(reqs, "\n") + "\n",
		"JSON lines, CRLF":  strings.Join(reqs, "\r\n"),
		"a JSON array":      "[" + strings.Join(reqs, ",\n") + "]",
		"an indented array": "  [\n  " + strings.Join(reqs, " ,\n  ") + "\n]\n",
		// Values may span lines, as jq prints them.
		"values over many lines": strings.NewReplacer("PATH", cases[0].path, "USER", cases[0].user).Replace(request) + "\n\n" + strings.Join(reqs[1:], "\n"),
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			if err := CheckBatch(context.Background(), cfg, strings.NewReader(in), &out); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
			if len(lines) != len(cases) {
				t.Fatalf("%d lines for %d requests:\n%s", len(lines), len(cases), out.String())
			}
			for i, c := range cases {
				var got struct {
					Allowed *bool  `json:"allowed"`
					Policy  string `json:"policy"`
				}
				if err := json.Unmarshal([]byte(lines[i]), &got); err != nil {
					t.Fatalf("line %d is not one JSON object: %v\n%s", i+1, err, lines[i])
				}
				if got.Allowed == nil || *got.Allowed != c.allowed || got.Policy != c.policy {
					t.Errorf("line %d (%s as %s) = %s", i+1, c.path, c.user, lines[i])
				}
			}
		})
	}
}

func TestCheckBatchBadInput(t *testing.T) {
	cfg := withBundle(Config{PolicyDir: "../../examples/policies"})
	good := strings.ReplaceAll(request, "\n", " ")
	for name, in := range map[string]string{
		"empty":                "",
		"empty array":          "[]",
		"not JSON":             "nope",
		"a bad request":        good + "\n" + `{"attributes": {"nope": 1}}`,
		"a truncated array":    "[" + good,
		"a number":             good + "\n42",
		"trailing after array": "[" + good + "] {}",
	} {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			err := CheckBatch(context.Background(), cfg, strings.NewReader(in), &out)
			if !errors.Is(err, ErrBadInput) {
				t.Fatalf("error %v, want ErrBadInput", err)
			}
			if out.Len() != 0 {
				t.Fatalf("bad input printed decisions:\n%s", out.String())
			}
		})
	}
}

// TestCheckRedactsPaths: a decision that quotes the path (here the error
// of a path that does not start with '/') shows it redacted.
func TestCheckRedactsPaths(t *testing.T) {
	cfg := withBundle(Config{PolicyDir: "../../examples/policies", RedactPaths: []string{`users/([^/"]+)`}})
	req := strings.NewReplacer("PATH", "users/carol", "USER", "alice").Replace(request)
	var out bytes.Buffer
	if err := Check(context.Background(), cfg, []byte(req), &out); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "carol") || !strings.Contains(out.String(), "users/REDACTED") {
		t.Fatalf("output does not redact the path:\n%s", out.String())
	}
	if err := Check(context.Background(), Config{PolicyDir: "../../examples/policies", RedactPaths: []string{"("}}, []byte(req), &out); !errors.Is(err, ErrBadInput) {
		t.Fatalf("a bad pattern: %v, want ErrBadInput", err)
	}
}
