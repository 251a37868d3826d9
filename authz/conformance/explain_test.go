package conformance_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/explaintest"
)

// TestExplainOracleCorpus explains every case of the corpora
// (`trustmesh policy explain`'s code path) and holds each explanation to
// the engine's own decision and to every rule the engine matched: the
// deciding policy and rule, the reason, and each rule's match or miss.
func TestExplainOracleCorpus(t *testing.T) {
	files := []string{committedCorpus}
	if extra := os.Getenv(corpusEnv); extra != "" {
		files = append(files, filepath.SplitList(extra)...)
	}
	for _, f := range files {
		cases, err := conformance.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(filepath.Base(f), func(t *testing.T) { explainCorpus(t, cases) })
	}
}

func explainCorpus(t *testing.T, cases []conformance.Case) {
	var err error
	ctx := context.Background()
	r := newRunner(t)
	var x *engine.Explainer
	var xFor *engine.Set
	explained, failed := 0, 0
	for i := range cases {
		c := &cases[i]
		r.load(c)
		if r.loadErr != nil {
			continue // TestIstioOracle reports it
		}
		if xFor != r.set {
			if x, err = r.set.Explainer(ctx); err != nil {
				t.Fatalf("case %d: %v", c.N, err)
			}
			xFor = r.set
		}
		req := checkRequest(&c.Request)
		d, _ := r.set.Check(ctx, req)
		ex, err := x.Explain(ctx, req)
		if err != nil {
			t.Errorf("case %d: %v", c.N, err)
			failed++
		} else {
			matching, _ := r.set.MatchingRules(ctx, req)
			msgs := explaintest.Disagreements(ex, d, matching)
			for _, m := range msgs {
				t.Errorf("case %d: %s", c.N, m)
			}
			if len(msgs) > 0 {
				failed++
			}
			if ex.Evaluated {
				explained++
			}
		}
		if failed >= 20 {
			t.Fatalf("stopping after %d cases that disagree", failed)
		}
	}
	t.Logf("%d cases, %d explained rule by rule", len(cases), explained)
	if explained < len(cases)/2 {
		t.Fatalf("only %d of %d cases were explained rule by rule", explained, len(cases))
	}
}
