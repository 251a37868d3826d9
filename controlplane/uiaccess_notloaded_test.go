package controlplane

import (
	"context"
	"errors"
	"testing"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ui"
)

// onePolicySource holds a fixed policy set.
type onePolicySource struct{ ps []*policy.Policy }

func (s onePolicySource) Policies() ([]*policy.Policy, error) { return s.ps, nil }
func (onePolicySource) Watch(ctx context.Context, _ func()) (<-chan error, error) {
	done := make(chan error, 1)
	go func() { <-ctx.Done(); done <- nil }()
	return done, nil
}

// TestUIAccessWaitsForThePolicies: before the policy feed's first snapshot
// the access view is not computed from an empty set, which shows every
// call allowed ("no ALLOW policy applies"); it answers ErrNotLoaded, which
// the page serves as 503. Once the feed loads, the view has its version.
func TestUIAccessWaitsForThePolicies(t *testing.T) {
	feed, err := source.NewFeed(source.FeedConfig{Policies: onePolicySource{}})
	if err != nil {
		t.Fatal(err)
	}
	u := &uiAccess{sh: &uiShared{slots: make(chan struct{}, uiViewSlots)}, policies: feed}
	if v, err := u.Access(context.Background()); !errors.Is(err, ui.ErrNotLoaded) {
		t.Fatalf("access view before the policies loaded: %+v, %v; want ErrNotLoaded", v, err)
	}
	if _, err := feed.Load(); err != nil {
		t.Fatal(err)
	}
	v, err := u.Access(context.Background())
	if err != nil || v.PolicyVersion != 1 {
		t.Fatalf("access view after the first load: %+v, %v; want policy version 1", v, err)
	}
}
