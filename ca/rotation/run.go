package rotation

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// Run reloads the material whenever the state changes (including changes
// made by `trustmesh ca rotate` in another process) and, when Automatic,
// applies the policy on every interval of the injected clock's ticker, on
// the leader only. It returns nil when ctx ends.
func (m *Manager) Run(ctx context.Context, apply func(*authority.Material)) error {
	if !m.serving {
		return ErrNotServing
	}
	t := m.cfg.Clock.NewTicker(m.policy.Interval)
	defer t.Stop()
	for {
		if m.cfg.Automatic && (m.cfg.IsLeader == nil || m.cfg.IsLeader()) {
			if _, err := m.Tick(ctx); err != nil {
				m.cfg.Log.Error("CA rotation step failed; will retry", "error", err)
			}
		}
		if err := m.Reload(ctx, apply); err != nil {
			m.cfg.Log.Error("could not reload the CA after a rotation; keeping the current one", "error", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
	}
}

// Initial returns the material in force, for start-up, and remembers it so
// that Run does not apply it a second time.
func (m *Manager) Initial(ctx context.Context) (*authority.Material, error) {
	var out *authority.Material
	err := m.Reload(ctx, func(mat *authority.Material) { out = mat })
	if err == nil && out == nil {
		err = errors.New("rotation: no material")
	}
	return out, err
}

// Reload applies the material in force when the state or the bundle has
// changed since the last reload.
func (m *Manager) Reload(ctx context.Context, apply func(*authority.Material)) error {
	mat, st, err := m.Material(ctx, m.cfg.Clock.Now())
	if err != nil {
		return err
	}
	key, _ := json.Marshal(struct {
		St    State
		Roots int
	}{st, len(mat.Roots)})
	m.mu.Lock()
	same := string(key) == string(m.lastSeen)
	m.lastSeen = key
	m.mu.Unlock()
	if !same {
		apply(mat)
	}
	return nil
}
