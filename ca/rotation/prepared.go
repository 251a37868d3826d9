package rotation

import (
	"context"
	"fmt"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// PreparedCertificates returns the prepared generation's certificates (its
// intermediate chain, and its root when a root was prepared) without its
// key, or nil when nothing is prepared: what the web UI's CA view shows of
// a prepared CA.
func (m *Manager) PreparedCertificates(ctx context.Context) (*authority.Material, error) {
	snap, st, err := m.read(ctx)
	if err != nil {
		return nil, err
	}
	if st.Next == 0 {
		return nil, nil
	}
	mat, err := authority.ReadCertificates(genFiles(snap, st.Next))
	if err != nil {
		return nil, fmt.Errorf("rotation: prepared generation %d: %w", st.Next, err)
	}
	return mat, nil
}
