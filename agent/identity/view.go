package identity

import (
	"context"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// View is what one caller of the Workload API or SDS may receive now: its
// SVIDs, sorted by SPIFFE ID (the first is its default), and the trust
// bundle. Like a Snapshot, its values are never modified once made.
type View struct {
	SVIDs  []*x509svid.SVID
	Bundle *x509bundle.Bundle
}

// NewView returns a view of svids, sorted by ID, and bundle. Nil SVIDs are
// left out.
func NewView(svids []*x509svid.SVID, bundle *x509bundle.Bundle) View {
	out := make([]*x509svid.SVID, 0, len(svids))
	for _, s := range svids {
		if s != nil {
			out = append(out, s)
		}
	}
	slices.SortStableFunc(out, func(a, b *x509svid.SVID) int { return strings.Compare(a.ID.String(), b.ID.String()) })
	return View{SVIDs: out, Bundle: bundle}
}

// Ready reports whether the view can be handed to a workload: at least one
// SVID and a bundle.
func (v View) Ready() bool { return len(v.SVIDs) > 0 && v.Bundle != nil }

// Same reports whether v and o hold the same SVIDs and bundle (the same
// values, not merely equal ones: every issuance is a new value).
func (v View) Same(o View) bool {
	return v.Bundle == o.Bundle && slices.Equal(v.SVIDs, o.SVIDs)
}

// Viewer is one caller's source of identities. View returns the caller's
// current view and a channel closed at its next change; an error ends the
// caller's streams with it (a gRPC status error, e.g. PermissionDenied once
// the caller may no longer have any identity). ctx is the caller's stream:
// anything View starts to watch for changes ends with it.
type Viewer interface {
	View(ctx context.Context) (View, <-chan struct{}, error)
}

// Loader is a single identity with change notification; *Store is one.
type Loader interface {
	Load() (Snapshot, <-chan struct{})
}

// Fixed returns the viewer of one identity that every caller gets: the
// per-pod agent's, whose callers are decided by the socket's permissions.
func Fixed(src Loader) Viewer { return fixed{src} }

type fixed struct{ src Loader }

func (f fixed) View(context.Context) (View, <-chan struct{}, error) {
	snap, changed := f.src.Load()
	return NewView([]*x509svid.SVID{snap.SVID}, snap.Bundle), changed, nil
}
