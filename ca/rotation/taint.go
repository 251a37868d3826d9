package rotation

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.step.sm/crypto/pemutil"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// Roles a CA certificate plays, as the journal's rotation records name them.
const (
	RoleIntermediate = "intermediate"
	RoleRoot         = "root"
)

// Tainted is a CA certificate marked compromised by Taint. It signs no more
// from the moment it is tainted; agents that see it in the bundle renew
// at once; a tainted root stays in the bundle, and a tainted intermediate
// in the bundle's tainted list, until the journal shows that no leaf
// signed under it is still valid (RetireTainted).
type Tainted struct {
	Role    string    `json:"role"`
	CertPEM string    `json:"cert_pem"`
	At      time.Time `json:"at"`
}

// Cert parses the tainted certificate.
func (t Tainted) Cert() (*x509.Certificate, error) {
	c, err := pemutil.ParseCertificate([]byte(t.CertPEM))
	if err != nil {
		return nil, fmt.Errorf("rotation: tainted %s: %w", t.Role, err)
	}
	return c, nil
}

// ErrOperatorSupplied refuses to taint a CA whose root key trustmesh does
// not hold: it cannot mint the replacement.
var ErrOperatorSupplied = errors.New("rotation: the active CA is operator-supplied, so no replacement can be minted here; " +
	"stage new material with trustmesh ca rotate --prepare --cacerts DIR, activate it with --activate --force, then taint the old one")

// Taint marks the active intermediate (or, with root, the active root) as
// compromised, and makes a new one sign at once: the prepared generation
// when it replaces what is tainted (a prepared root for a root, a prepared
// intermediate for an intermediate), else a freshly minted one. A tainted
// root's replacement is activated without waiting for its propagation:
// the compromise outweighs the agents that have not seen the new root yet.
// The state is written once, so a crash leaves either the old state or the
// whole change; the journal records the taint, the prepare and the
// activate after it, and Reconcile records what a crash left out.
func (m *Manager) Taint(ctx context.Context, root bool) (*x509.Certificate, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return nil, err
	}
	active := genFiles(snap, st.Active)
	if selfManaged, err := authority.SelfManaged(active); err != nil {
		return nil, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
	} else if !selfManaged {
		return nil, ErrOperatorSupplied
	}
	cur, err := authority.ReadCertificates(active)
	if err != nil {
		return nil, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
	}
	victim, role := cur.Cert, RoleIntermediate
	if root {
		if cur.Anchor == nil {
			return nil, errors.New("rotation: the active generation has no root to taint")
		}
		victim, role = cur.Anchor, RoleRoot
	}
	for _, t := range st.Tainted {
		if c, err := t.Cert(); err == nil && c.Equal(victim) {
			return nil, fmt.Errorf("rotation: %s %s is already tainted", role, victim.SerialNumber.Text(16))
		}
	}

	n, minted := st.Next, false
	if n != 0 && st.NextIsRoot != root {
		m.cfg.Log.Warn("dropping the prepared CA: it does not replace what is tainted", "generation", n, "prepared_root", st.NextIsRoot)
		n = 0
	}
	if n == 0 {
		files, _, _, err := m.mint(ctx, snap, st, root, now)
		if err != nil {
			return nil, err
		}
		n, minted = st.LastGeneration+1, true
		putGeneration(snap, n, files)
		st.LastGeneration = n
	}
	next, err := authority.LoadFiles(ctx, genFiles(snap, n), "", now)
	if err != nil {
		return nil, fmt.Errorf("rotation: the replacement CA is not usable: %w", err)
	}
	if !root && next.Anchor != nil && cur.Anchor != nil && !next.Anchor.Equal(cur.Anchor) {
		return nil, errors.New("rotation: the replacement intermediate is under another root")
	}
	stepGeneration(ctx, n)
	st.Tainted = append(st.Tainted, Tainted{Role: role, CertPEM: pemCert(victim), At: now})
	st.Active, st.Next, st.NextIsRoot, st.PreparedAt, st.ActivatedAt = n, 0, false, time.Time{}, now
	if err := m.write(ctx, snap, st); err != nil {
		return nil, err
	}
	m.cfg.Log.Warn("tainted the CA and activated its replacement", "role", role,
		"tainted", victim.SerialNumber.Text(16), "generation", n, "intermediate", next.Cert.SerialNumber.Text(16))

	steps := []struct {
		step, role string
		c          *x509.Certificate
	}{{"taint", role, victim}}
	if minted {
		if root {
			steps = append(steps, struct {
				step, role string
				c          *x509.Certificate
			}{"prepare", RoleRoot, next.Anchor})
		}
		steps = append(steps, struct {
			step, role string
			c          *x509.Certificate
		}{"prepare", RoleIntermediate, next.Cert})
	}
	steps = append(steps, struct {
		step, role string
		c          *x509.Certificate
	}{"activate", RoleIntermediate, next.Cert})
	if next.Anchor != nil {
		steps = append(steps, struct {
			step, role string
			c          *x509.Certificate
		}{"activate", RoleRoot, next.Anchor})
	}
	for _, s := range steps {
		if err := m.record(ctx, s.step, s.role, s.c, now); err != nil {
			return victim, err
		}
	}
	return victim, nil
}

func pemCert(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// TaintedCertificates returns the tainted CA certificates still in the
// bundle, for the bundle stream to mark.
func (m *Manager) TaintedCertificates(ctx context.Context) ([]*x509.Certificate, error) {
	_, st, err := m.read(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*x509.Certificate, 0, len(st.Tainted))
	for _, t := range st.Tainted {
		c, err := t.Cert()
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// EntryReader reads the journal's entries in order; the serving control
// plane's journal is one. RetireTainted and Reconcile read it through the
// Recorder when the Recorder is one too.
type EntryReader interface {
	Entries(ctx context.Context, from uint64, limit int) ([]journal.Entry, error)
}

// journalIndex is what the journal says about rotation, read once and then
// from where it stopped: the latest NotAfter of the leaves each
// intermediate signed, and the rotation records.
type journalIndex struct {
	next    uint64
	leaves  map[string]time.Time
	records map[string]bool
}

func recordKey(step, role, serial string) string { return step + " " + role + " " + serial }

// scan brings m's journal index up to date; ok is false when the Recorder
// cannot be read.
func (m *Manager) scan(ctx context.Context) (_ *journalIndex, ok bool, _ error) {
	r, isReader := m.cfg.Recorder.(EntryReader)
	if !isReader {
		return nil, false, nil
	}
	m.jmu.Lock()
	defer m.jmu.Unlock()
	if m.index == nil {
		m.index = &journalIndex{leaves: map[string]time.Time{}, records: map[string]bool{}}
	}
	ix := m.index
	for {
		page, err := r.Entries(ctx, ix.next, 1000)
		if err != nil {
			return nil, false, fmt.Errorf("rotation: read the journal: %w", err)
		}
		for _, e := range page {
			switch e.Kind {
			case journal.KindIssuance, journal.KindRotation:
				rec, err := e.Decode()
				if err != nil {
					return nil, false, fmt.Errorf("rotation: read the journal: %w", err)
				}
				switch rec := rec.(type) {
				case *journal.Issuance:
					if rec.NotAfter.After(ix.leaves[rec.Issuer]) {
						ix.leaves[rec.Issuer] = rec.NotAfter
					}
				case *journal.Rotation:
					ix.records[recordKey(rec.Step, rec.Role, rec.Serial)] = true
				}
			}
			ix.next = e.Index + 1
		}
		if len(page) < 1000 {
			return ix, true, nil
		}
	}
}

// recorded reports whether the journal holds the rotation record.
func (m *Manager) recorded(ctx context.Context, step, role string, c *x509.Certificate) (bool, error) {
	ix, ok, err := m.scan(ctx)
	if err != nil || !ok {
		return false, err
	}
	m.jmu.Lock()
	defer m.jmu.Unlock()
	return ix.records[recordKey(step, role, c.SerialNumber.Text(16))], nil
}

// taintedUntil is when nothing valid chains to t any more: the latest
// NotAfter of the leaves the journal shows signed under it (under any
// intermediate of a tainted root). Without a journal to read it is the
// retirement time of a replaced root, counted from the taint.
func (m *Manager) taintedUntil(ctx context.Context, snap Snapshot, st State, t Tainted, c *x509.Certificate) (time.Time, error) {
	ix, ok, err := m.scan(ctx)
	if err != nil {
		return time.Time{}, err
	}
	if !ok {
		return t.At.Add(max(m.policy.MaxWorkloadTTL, st.RetireAfter) + time.Hour), nil
	}
	issuers := []string{c.SerialNumber.Text(16)}
	if t.Role == RoleRoot {
		for g := 1; g <= st.LastGeneration; g++ {
			mat, err := authority.ReadCertificates(genFiles(snap, g))
			if err != nil || mat.Anchor == nil || !mat.Anchor.Equal(c) {
				continue
			}
			issuers = append(issuers, mat.Cert.SerialNumber.Text(16))
		}
	}
	m.jmu.Lock()
	defer m.jmu.Unlock()
	var until time.Time
	for _, s := range issuers {
		if ix.leaves[s].After(until) {
			until = ix.leaves[s]
		}
	}
	return until, nil
}

// RetireTainted drops from the bundle each tainted CA certificate that
// nothing valid chains to any more, and records its retirement. It waits
// two check intervals after the taint first, so that every replica has
// switched to the replacement and the journal holds the last leaf the
// tainted one signed.
func (m *Manager) RetireTainted(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	kept := st.Tainted[:0:0]
	for _, t := range st.Tainted {
		c, err := t.Cert()
		if err != nil {
			return err
		}
		if now.Before(t.At.Add(2 * m.policy.Interval)) {
			kept = append(kept, t)
			continue
		}
		until, err := m.taintedUntil(ctx, snap, st, t, c)
		if err != nil {
			return err
		}
		if now.Before(until) {
			kept = append(kept, t)
			continue
		}
		// Recorded first, once: a crash before the state is written
		// retires it again at the next check without a second record.
		done, err := m.recorded(ctx, "retire", t.Role, c)
		if err != nil {
			return err
		}
		if !done {
			if err := m.record(ctx, "retire", t.Role, c, now); err != nil {
				return err
			}
		}
		m.cfg.Log.Info("a tainted CA certificate left the bundle: nothing valid chains to it", "role", t.Role,
			"serial", c.SerialNumber.Text(16), "last_leaf_expired", until)
	}
	if len(kept) == len(st.Tainted) {
		return nil
	}
	st.Tainted = kept
	return m.write(ctx, snap, st)
}

// Reconcile makes the journal agree with the state after a crash: every
// step the state shows taken (the prepared generation, the activation of
// the active one, each taint) is recorded, at the time the state gives it,
// unless the journal holds it already. Steps record after the state is
// written, so a crash between the two leaves a step in the state only;
// retirements record first and skip a record the journal holds, so the
// journal never shows a step the state lacks. It does nothing without a
// journal to read.
func (m *Manager) Reconcile(ctx context.Context) error {
	if _, ok := m.cfg.Recorder.(EntryReader); !ok {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	type want struct {
		step, role string
		c          *x509.Certificate
		at         time.Time
	}
	var wants []want
	for _, t := range st.Tainted {
		c, err := t.Cert()
		if err != nil {
			return err
		}
		wants = append(wants, want{"taint", t.Role, c, t.At})
	}
	if !st.ActivatedAt.IsZero() {
		mat, err := authority.ReadCertificates(genFiles(snap, st.Active))
		if err != nil {
			return fmt.Errorf("rotation: generation %d: %w", st.Active, err)
		}
		wants = append(wants, want{"prepare", RoleIntermediate, mat.Cert, st.ActivatedAt},
			want{"activate", RoleIntermediate, mat.Cert, st.ActivatedAt})
		if mat.Anchor != nil {
			wants = append(wants, want{"activate", RoleRoot, mat.Anchor, st.ActivatedAt})
		}
	}
	if st.Next != 0 {
		mat, err := authority.ReadCertificates(genFiles(snap, st.Next))
		if err != nil {
			return fmt.Errorf("rotation: prepared generation %d: %w", st.Next, err)
		}
		if st.NextIsRoot && mat.Anchor != nil {
			wants = append(wants, want{"prepare", RoleRoot, mat.Anchor, st.PreparedAt})
		}
		wants = append(wants, want{"prepare", RoleIntermediate, mat.Cert, st.PreparedAt})
	}
	slices.SortStableFunc(wants, func(a, b want) int { return a.at.Compare(b.at) })
	for _, w := range wants {
		done, err := m.recorded(ctx, w.step, w.role, w.c)
		if err != nil {
			return err
		}
		if done {
			continue
		}
		m.cfg.Log.Warn("recording a rotation step the journal lacks (the process stopped between the state and the journal)",
			"step", w.step, "role", w.role, "serial", w.c.SerialNumber.Text(16), "at", w.at)
		if err := m.record(ctx, w.step, w.role, w.c, w.at); err != nil {
			return err
		}
		m.jmu.Lock()
		m.index.records[recordKey(w.step, w.role, w.c.SerialNumber.Text(16))] = true
		m.jmu.Unlock()
	}
	return nil
}
