package controlplane

import (
	"context"
	"slices"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/ui"
)

// uiDenials reads the decision log's recent denials and names the
// services of their sides as the access view does, so that a denial's
// link selects its access cell.
type uiDenials struct {
	log    *decisionlog.Logger
	access *uiAccess
}

func (u *uiDenials) Denials(limit int) ([]ui.Denial, bool, uint64) {
	if u.log == nil {
		return []ui.Denial{}, false, 0
	}
	idx := &serviceIndex{}
	if u.access != nil {
		// Errors leave the sides unnamed; the access view reports them.
		if st, err := u.access.state(context.Background()); err == nil {
			idx = st.index
		}
	}
	entries := u.log.Recent(limit)
	out := make([]ui.Denial, 0, len(entries))
	for _, e := range entries {
		out = append(out, ui.Denial{
			Time: e.Time.UTC(), DecisionID: e.DecisionID,
			Source:      ui.Peer{Principal: e.Source.Principal, Address: e.Source.Address},
			Destination: ui.Peer{Principal: e.Destination.Principal, Address: e.Destination.Address},
			Method:      e.Method, Host: e.Host, Path: e.Path, Policy: e.Policy, Rule: e.Rule, Action: e.Action, Reason: e.Reason,
			FromService: idx.name(e.Source.Address, e.Source.Principal),
			ToService:   idx.name(e.Destination.Address, e.Destination.Principal),
		})
	}
	return out, true, u.log.Dropped()
}

// serviceIndex names the access matrix's Service ("ns/name", or "ns/sa"
// for workloads that serve no service) behind a SPIFFE ID or an address.
type serviceIndex struct {
	// byID lists the matrix's Services that have an identity; byAddr
	// names the one service behind an endpoint address, "" when
	// several share it.
	byID   map[string][]string
	byAddr map[string]string
}

// newServiceIndex indexes the matrix's Services by their identities, and
// the mesh's service endpoints by address.
func newServiceIndex(mat *access.Matrix, m *mesh.Mesh) *serviceIndex {
	idx := &serviceIndex{byID: map[string][]string{}, byAddr: map[string]string{}}
	for _, s := range mat.Services {
		for _, id := range s.Identities {
			idx.byID[id] = append(idx.byID[id], s.ID)
		}
	}
	for _, s := range m.Services {
		for _, e := range s.Endpoints {
			if e.Address == "" {
				continue
			}
			if old, ok := idx.byAddr[e.Address]; ok && old != s.Key() {
				idx.byAddr[e.Address] = "" // shared by several services
				continue
			}
			idx.byAddr[e.Address] = s.Key()
		}
	}
	return idx
}

// name names the side of a denial with this authenticated principal and
// address. The principal decides: mTLS authenticated it, while addresses
// are shared (several workloads on one host) and reused. Of several
// services with that identity, the one at the address is it; with no
// principal (plaintext), the address is all there is. "" when the mesh
// does not know it or it is ambiguous.
func (idx *serviceIndex) name(addr, principal string) string {
	if principal == "" {
		return idx.byAddr[addr]
	}
	svcs := idx.byID[principal]
	switch {
	case len(svcs) == 1:
		return svcs[0]
	case len(svcs) > 1:
		if at := idx.byAddr[addr]; at != "" && slices.Contains(svcs, at) {
			return at
		}
	}
	return ""
}
