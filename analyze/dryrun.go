package analyze

import (
	"fmt"
	"time"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/internal/human"
)

// DefaultStaleDryRun is how long a dry-run policy may stay before TMA020
// reports it.
const DefaultStaleDryRun = 14 * 24 * time.Hour

var dryRunAnalyzer = Analyzer{
	Code: "TMA020",
	Name: "stale-dry-run",
	Description: "A dry-run policy (istio.io/dry-run: \"true\") created longer ago than --stale-dry-run: its decisions " +
		"are only logged, never enforced. Needs the policies' creation times, so only on a cluster.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Created == nil {
			return nil, "the policies' creation times are known only on a cluster (--kubeconfig); files have none"
		}
		stale := in.StaleDryRun
		if stale <= 0 {
			stale = DefaultStaleDryRun
		}
		var out []Finding
		for _, p := range in.Policies {
			created, ok := in.Created[p.Key()]
			if !p.DryRun || !ok {
				continue
			}
			age := in.Now.Sub(created)
			if age <= stale {
				continue
			}
			out = append(out, Finding{
				Code: "TMA020", Severity: SeverityInfo, Object: policyObject(p), Origin: p.Origin,
				Field: "metadata.annotations[" + policy.DryRunAnnotation + "]",
				Message: fmt.Sprintf("in dry-run since %s (%s), longer than --stale-dry-run %s: its decisions are only logged, never enforced. "+
					"Enforce it (remove the annotation) once the decision log shows it denies only what it should, or delete it",
					created.UTC().Format(time.RFC3339), human.Duration(age), human.Duration(stale)),
			})
		}
		return out, ""
	},
}
