package check

import (
	"context"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/human"
)

// CodeClock: what the journal's times say of the CA's clock.
const CodeClock = "TM-CA-005"

// checkClock judges the CA's clock by its journal. An issuance dated more
// than the CA's clock allowance after this check's clock means the CA's
// clock ran ahead (or this machine's is behind): a CA whose clock is set
// right again refuses to sign until it catches up with that issuance. A
// forward jump while issuing went on (audit's clock-jump-forward: an
// issuance dated after every earlier certificate had expired) is a
// warning.
func checkClock(ctx context.Context, cfg Config, r *Report, store *journal.Store) {
	latest, err := store.LatestIssuanceTime(ctx)
	if err != nil {
		r.add(CodeClock, Error, "journal", "", "the latest issuance time cannot be read: %v", err)
		return
	}
	ok := true
	if ahead := latest.Sub(cfg.Now); ahead > ca.DefaultMaxClockSkew {
		ok = false
		r.add(CodeClock, Error, "journal",
			"compare the CA's clock with a time source (timedatectl, chronyc tracking); once it is right, the CA signs nothing until its clock passes that issuance less the allowance, or an operator decides otherwise",
			"the latest issuance is dated %s, %s after this check's clock: the CA's clock ran ahead, or this machine's is behind", human.Time(latest), human.Duration(ahead))
	}
	var s audit.Scanner
	if err := s.Update(ctx, store); err != nil {
		r.add(CodeClock, Error, "journal", "", "the journal cannot be read: %v", err)
		return
	}
	for _, f := range s.Report(nil, cfg.Now, 0).Findings {
		if f.Kind != "clock-jump-forward" {
			continue
		}
		ok = false
		r.add(CodeClock, Warning, f.Subject,
			"a CA down for a whole certificate life also does this; otherwise check the CA's clock source, and trustmesh audit rotation for the certificates around it",
			"%s", f.Detail)
	}
	if ok {
		r.add(CodeClock, OK, "journal", "", "issuance times run in order; the latest is %s", human.Time(latest))
	}
}
