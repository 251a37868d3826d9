package ca

import (
	"context"
	"fmt"
	"time"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// DefaultMaxClockSkew is how far the CA's clock may be behind the journal's
// newest issuance before the CA stops signing. Five minutes is the backdate of
// the CA certificates the CA mints itself (authority.DefaultBackdate): a
// clock that far behind the moment an intermediate was minted is still
// inside that intermediate's validity. It also stays at the minimum
// workload TTL (DefaultMinTTL): a certificate signed by a clock that is
// behind by the allowance is at worst one short certificate's life old
// when it is delivered, never one that a renewing agent could not use.
// Steps of an NTP correction or a VM's restore are far smaller; a clock
// that is further behind is broken, and every certificate it signed would
// carry dates out of order with the journal that vouches for it.
const DefaultMaxClockSkew = 5 * time.Minute

// Refusal reasons of the clock guard.
const (
	// ReasonClockBehind: the CA's clock is behind the journal's newest
	// issuance by more than the allowance: it signs nothing until it is
	// within bounds.
	ReasonClockBehind = "clock-behind-journal"
	// ReasonClockBeforeIssuer: a certificate signed now would start
	// before its issuing certificate does.
	ReasonClockBeforeIssuer = "clock-before-issuer"
	// ReasonClockUnchecked: the journal's newest time could not be read.
	ReasonClockUnchecked = "clock-unchecked"
)

// latestIssuanceTimer is the journal's newest issuance time (journal.Store).
type latestIssuanceTimer interface {
	LatestIssuanceTime(ctx context.Context) (time.Time, error)
}

// maxClockSkew is the allowance checkClock applies.
func (c *CA) maxClockSkew() time.Duration { return c.cfg.MaxClockSkew }

// checkClock refuses to sign, with KindUnavailable so that callers retry,
// while the CA's clock at now is behind the journal's newest issuance by
// more than the allowance, or while now, less the workload backdate, is
// before the issuing certificate's NotBefore (checkIssuerStart). sign calls
// it right after it reads the clock, before anything is minted.
func (c *CA) checkClock(ctx context.Context, now time.Time, m *authority.Material) error {
	if lt, ok := c.cfg.Recorder.(latestIssuanceTimer); ok {
		latest, err := lt.LatestIssuanceTime(ctx)
		if err != nil {
			return refuseErr(ReasonClockUnchecked, KindUnavailable, fmt.Errorf("check the clock against the journal: %w", err))
		}
		if behind := latest.Sub(now); behind > c.maxClockSkew() {
			return refuse(ReasonClockBehind, KindUnavailable,
				"clock is %s behind the journal's latest issuance at %s (allowance %s): not signing until it is within bounds",
				behind, latest.UTC().Format(time.RFC3339Nano), c.maxClockSkew())
		}
	}
	return c.checkIssuerStart(now, m)
}

// checkIssuerStart refuses, with KindUnavailable, a certificate that would
// start (now less the backdate) before its issuing certificate does. It
// happens only to a clock that went back behind the moment the issuing
// certificate was minted, by more than the difference between the CA
// certificates' backdate (5 minutes) and the workloads' (30 seconds).
func (c *CA) checkIssuerStart(now time.Time, m *authority.Material) error {
	start, nb := now.Add(-c.cfg.Backdate), m.Cert.NotBefore
	if start.Before(nb) {
		return refuse(ReasonClockBeforeIssuer, KindUnavailable,
			"clock is %s behind the issuing certificate %q, valid from %s: a certificate signed now would start before its issuer",
			nb.Sub(start), m.Cert.Subject.String(), nb.UTC().Format(time.RFC3339))
	}
	return nil
}
