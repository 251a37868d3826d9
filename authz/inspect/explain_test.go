package inspect

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/engine"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestExplainGolden pins what `trustmesh policy explain` prints, as text
// and as JSON, for requests whose rules miss on named fields; refresh with
// -update and review the diff like code.
func TestExplainGolden(t *testing.T) {
	shop := ExplainConfig{Config: Config{PolicyDir: "testdata/explain/policies", RedactPaths: []string{`^/users/([^/]+)`}}}
	tests := []struct {
		name, request string
		cfg           ExplainConfig
		allowed       bool
		// secrets are request values the output must never show.
		secrets []string
	}{
		{"productpage-admin", "../../examples/policies/requests/productpage-admin.json", withBundleX(ExplainConfig{Config: Config{PolicyDir: "../../examples/policies"}}), false, nil},
		{"productpage-get", "../../examples/policies/requests/productpage-get.json", withBundleX(ExplainConfig{Config: Config{PolicyDir: "../../examples/policies"}}), true, []string{"normal"}},
		{"http-denied", "testdata/explain/requests/http-denied.json", shop, false, []string{"alice", "s3cret", "guess"}},
		{"tcp", "testdata/explain/requests/tcp.json", shop, false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := os.ReadFile(tt.request)
			if err != nil {
				t.Fatal(err)
			}
			ex, err := Explain(context.Background(), tt.cfg, req)
			if err != nil {
				t.Fatal(err)
			}
			if ex.Decision.Allowed != tt.allowed {
				t.Fatalf("allowed = %t, want %t", ex.Decision.Allowed, tt.allowed)
			}
			var text, js bytes.Buffer
			if err := WriteExplanation(&text, ex); err != nil {
				t.Fatal(err)
			}
			enc := json.NewEncoder(&js)
			enc.SetIndent("", "  ")
			if err := enc.Encode(ex); err != nil {
				t.Fatal(err)
			}
			for _, out := range []string{text.String(), js.String()} {
				for _, s := range tt.secrets {
					if strings.Contains(out, s) {
						t.Errorf("output shows %q:\n%s", s, out)
					}
				}
			}
			golden(t, "testdata/explain/"+tt.name+".txt.golden", text.String())
			golden(t, "testdata/explain/"+tt.name+".json.golden", js.String())
		})
	}
}

func golden(t *testing.T, file, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if string(want) != got {
		t.Errorf("%s differs; run with -update and review:\n%s", file, got)
	}
}

// TestExplainAgreesWithCheck: explain's decision is the one `policy
// check` prints for the same request.
func TestExplainAgreesWithCheck(t *testing.T) {
	cfg := withBundleX(ExplainConfig{Config: Config{PolicyDir: "../../examples/policies"}})
	for _, path := range []string{"/productpage", "/static/../admin", "/reviews", "users/carol"} {
		for _, user := range []string{"alice", "mallory"} {
			req := []byte(strings.NewReplacer("PATH", path, "USER", user).Replace(request))
			var out bytes.Buffer
			if err := Check(context.Background(), cfg.Config, req, &out); err != nil {
				t.Fatal(err)
			}
			var want engine.Decision
			if err := json.Unmarshal(out.Bytes(), &want); err != nil {
				t.Fatal(err)
			}
			ex, err := Explain(context.Background(), cfg, req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(ex.Decision)
			w, _ := json.Marshal(&want)
			if string(got) != string(w) {
				t.Errorf("%s as %s: explain decided %s, check %s", path, user, got, w)
			}
		}
	}
}

func TestExplainBadInput(t *testing.T) {
	cfg := withBundleX(ExplainConfig{Config: Config{PolicyDir: "../../examples/policies"}})
	for name, tc := range map[string]struct {
		cfg ExplainConfig
		req string
	}{
		"bad request":      {cfg, `{"attributes": {"nope": 1}}`},
		"no policies":      {ExplainConfig{}, request},
		"unknown provider": {ExplainConfig{Config: Config{PolicyDir: "../../examples/policies"}}, request},
		"bad pattern":      {ExplainConfig{Config: Config{PolicyDir: "../../examples/policies", RedactPaths: []string{"("}}}, request},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Explain(context.Background(), tc.cfg, []byte(tc.req)); !errors.Is(err, ErrBadInput) {
				t.Fatalf("error %v, want ErrBadInput", err)
			}
		})
	}
}

func withBundleX(c ExplainConfig) ExplainConfig {
	c.Config = withBundle(c.Config)
	return c
}
