// Package rotation rotates the CA's own certificates with overlap, in
// SPIRE's spirit: prepare, then activate.
//
// Self-managed material lives in numbered generations under the CA
// directory (gen-1, gen-2, …), each in Istio's cacerts layout, and a state
// file names the active generation, the prepared one, and the roots that are
// retiring. Every change writes a new generation first and then replaces the
// state file atomically, so a crash leaves either the old state or the new.
//
//   - Intermediates: the next intermediate is prepared under the active root
//     at half the current one's life and activated at two thirds. The trust
//     bundle does not change; chains carry intermediates.
//   - Roots: the next root (with an intermediate under it) is prepared when
//     the active root has a fifth of its life left; it enters the trust
//     bundle at once, so it reaches every agent before anything is signed
//     under it, and is activated RootPropagation later. The old root stays in
//     the bundle until every certificate signed under it has expired.
package rotation

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// Errors callers branch on.
var (
	ErrAlreadyPrepared = errors.New("rotation: a next CA is already prepared; activate it first")
	ErrNothingPrepared = errors.New("rotation: no next CA is prepared")
	// ErrNoCA is returned to a manager driven from the command line when
	// the store holds no CA: only a serving control plane creates one.
	ErrNoCA = errors.New("rotation: no CA here (serve creates it; with serve --ca-secret, name the Secret)")
	// ErrTooEarly refuses to activate a new root before it has had time to
	// reach every agent through the bundle stream.
	ErrTooEarly = errors.New("rotation: the prepared root has not been in the trust bundle long enough")
)

const stateFile = "rotation.json"

// State is the rotation state on disk.
type State struct {
	Active int `json:"active"`
	// Next is the prepared generation, 0 when none.
	Next           int        `json:"next,omitempty"`
	NextIsRoot     bool       `json:"next_is_root,omitempty"`
	PreparedAt     time.Time  `json:"prepared_at,omitzero"`
	ActivatedAt    time.Time  `json:"activated_at,omitzero"`
	Retiring       []Retiring `json:"retiring,omitempty"`
	LastGeneration int        `json:"last_generation"`
	// RetireAfter is how long an old root stays in the bundle after a new
	// one is activated: the longest workload certificate the serving
	// control plane issues, recorded so that the CLI honours it too.
	RetireAfter time.Duration `json:"retire_after,omitempty"`
	// RootPropagation is how long a prepared root must sit in the bundle
	// before it may be activated.
	RootPropagation time.Duration `json:"root_propagation,omitempty"`
}

// Retiring is a root kept in the bundle until Until.
type Retiring struct {
	CertPEM string    `json:"cert_pem"`
	Until   time.Time `json:"until"`
}

// Recorder records rotation steps in the journal.
type Recorder interface {
	RecordRotation(ctx context.Context, r journal.Rotation) error
}

// Config configures a Manager.
type Config struct {
	// Store holds the generations and the state file. When nil, Dir is used
	// through a DirStore.
	Store Store
	// Dir is the CA directory holding the generations and the state file.
	Dir         string
	TrustDomain spiffeid.TrustDomain
	Recorder    Recorder
	Clock       clock.WithTicker
	Log         *slog.Logger
	// MaxWorkloadTTL bounds how long certificates signed under a retired
	// root live, so how long it stays in the bundle.
	MaxWorkloadTTL time.Duration
	// IntermediateLifetime and RootLifetime of new CA certificates.
	IntermediateLifetime, RootLifetime time.Duration
	// Backdate is how far before their creation new CA certificates become
	// valid. Default authority.DefaultBackdate.
	Backdate time.Duration
	// RootPropagation is how long a prepared root stays in the bundle before
	// it is activated automatically. Default 24h.
	RootPropagation time.Duration
	// Interval between automatic checks. Default 1m.
	Interval time.Duration
	// Automatic turns on the rotation policy in Run; Run always reloads.
	Automatic bool
	// IsLeader, when set, gates automatic rotation to one replica.
	IsLeader func() bool
	// FromCLI marks a manager driven by hand from the command line: it
	// honours the retirement and propagation times the serving control
	// plane recorded in the state instead of its own defaults, and it never
	// creates a CA where there is none (ErrNoCA), so that a command pointed
	// at the wrong place cannot print or rotate a CA nobody serves.
	FromCLI bool
}

// Manager owns the CA directory's rotation state.
type Manager struct {
	cfg Config
	mu  sync.Mutex
	// onChange receives new material after every change.
	onChange func(*authority.Material)
	lastSeen []byte
}

// New returns a Manager. A serving manager creates the first generation on
// first use; one with FromCLI never does (ErrNoCA).
func New(cfg Config) (*Manager, error) {
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.IntermediateLifetime == 0 {
		cfg.IntermediateLifetime = authority.IntermediateLifetime
	}
	if cfg.RootLifetime == 0 {
		cfg.RootLifetime = authority.RootLifetime
	}
	if cfg.RootPropagation == 0 {
		cfg.RootPropagation = 24 * time.Hour
	}
	if cfg.Interval == 0 {
		cfg.Interval = time.Minute
	}
	if cfg.MaxWorkloadTTL == 0 {
		cfg.MaxWorkloadTTL = 24 * time.Hour
	}
	if cfg.Store == nil {
		if cfg.Dir == "" {
			return nil, errors.New("rotation: a store or a directory is required")
		}
		if !cfg.FromCLI { // which never creates a CA, nor its directory
			if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
				return nil, fmt.Errorf("rotation: %w", err)
			}
		}
		cfg.Store = DirStore{Dir: cfg.Dir}
	}
	return &Manager{cfg: cfg}, nil
}

func genPrefix(n int) string { return fmt.Sprintf("gen-%d/", n) }

// genFiles returns generation n's files by their cacerts names.
func genFiles(snap Snapshot, n int) map[string][]byte {
	out := map[string][]byte{}
	p := genPrefix(n)
	for name, v := range snap.Files {
		if strings.HasPrefix(name, p) {
			out[strings.TrimPrefix(name, p)] = v
		}
	}
	return out
}

func parseState(b []byte) (State, error) {
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return State{}, fmt.Errorf("rotation: %s: %w", stateFile, err)
	}
	if st.Active <= 0 {
		return State{}, fmt.Errorf("rotation: %s names no active generation", stateFile)
	}
	return st, nil
}

// read returns the current snapshot and state. When there is none, a
// serving manager creates the first generation (exactly once, even with
// several replicas starting together) and one with FromCLI returns ErrNoCA.
func (m *Manager) read(ctx context.Context) (Snapshot, State, error) {
	for attempt := 0; ; attempt++ {
		snap, err := m.cfg.Store.Read(ctx)
		if err != nil {
			return Snapshot{}, State{}, err
		}
		if b, ok := snap.Files[stateFile]; ok {
			st, err := parseState(b)
			return snap, st, err
		}
		if m.cfg.FromCLI {
			return Snapshot{}, State{}, ErrNoCA
		}
		files, err := authority.NewSelfManagedFiles(m.cfg.TrustDomain, m.cfg.Clock.Now(), authority.Lifetimes{
			Root: m.cfg.RootLifetime, Intermediate: m.cfg.IntermediateLifetime, Backdate: m.cfg.Backdate,
		})
		if err != nil {
			return Snapshot{}, State{}, err
		}
		st := State{Active: 1, LastGeneration: 1}
		for name, v := range files {
			snap.Files[genPrefix(1)+name] = v
		}
		err = m.write(ctx, snap, st)
		if errors.Is(err, ErrConflict) && attempt < 3 {
			continue // another replica created it first: use theirs
		}
		if err != nil {
			return Snapshot{}, State{}, err
		}
	}
}

func (m *Manager) write(ctx context.Context, snap Snapshot, st State) error {
	if m.cfg.MaxWorkloadTTL > st.RetireAfter && !m.cfg.FromCLI {
		st.RetireAfter = m.cfg.MaxWorkloadTTL
	}
	if !m.cfg.FromCLI {
		st.RootPropagation = m.cfg.RootPropagation
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	snap.Files[stateFile] = b
	return m.cfg.Store.Write(ctx, snap)
}

// ReadState returns the state, creating the first generation when there is
// none.
func (m *Manager) ReadState(ctx context.Context) (State, error) {
	_, st, err := m.read(ctx)
	return st, err
}

// Material loads the material in force at now: the active generation's
// signer and chain, and a trust bundle of the active roots, the prepared
// root, and the retiring roots still needed.
func (m *Manager) Material(ctx context.Context, now time.Time) (*authority.Material, State, error) {
	return m.material(ctx, now, func(files map[string][]byte) (*authority.Material, error) {
		return authority.LoadFiles(ctx, files, "", now)
	})
}

// Certificates is Material without the key and without judging the
// certificates at now: what the trust bundle and the rotation audit read.
// It needs no access to the key, and still answers for a CA that has
// expired or is not yet valid, which is what an audit must report.
func (m *Manager) Certificates(ctx context.Context, now time.Time) (*authority.Material, State, error) {
	return m.material(ctx, now, authority.ReadCertificates)
}

func (m *Manager) material(ctx context.Context, now time.Time, load func(map[string][]byte) (*authority.Material, error)) (*authority.Material, State, error) {
	snap, st, err := m.read(ctx)
	if err != nil {
		return nil, State{}, err
	}
	mat, err := load(genFiles(snap, st.Active))
	if err != nil {
		return nil, State{}, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
	}
	add := func(c *x509.Certificate) {
		for _, r := range mat.Roots {
			if r.Equal(c) {
				return
			}
		}
		mat.Roots = append(mat.Roots, c)
	}
	if st.Next != 0 {
		roots, err := pemutil.ParseCertificateBundle(genFiles(snap, st.Next)[authority.RootCertFile])
		if err != nil {
			return nil, State{}, fmt.Errorf("rotation: prepared generation: %w", err)
		}
		for _, r := range roots {
			add(r)
		}
	}
	for _, r := range st.Retiring {
		if !now.Before(r.Until) {
			continue
		}
		c, err := pemutil.ParseCertificate([]byte(r.CertPEM))
		if err != nil {
			return nil, State{}, fmt.Errorf("rotation: retiring root: %w", err)
		}
		add(c)
	}
	return mat, st, nil
}

// Prepare creates the next CA: an intermediate under the active root, or
// with root set, a new root and an intermediate under it. The new root joins
// the trust bundle at once; nothing is signed under it until Activate.
func (m *Manager) Prepare(ctx context.Context, root bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	if st.Next != 0 {
		return ErrAlreadyPrepared
	}
	active := genFiles(snap, st.Active)
	var parent *x509.Certificate
	var parentKey crypto.Signer
	if root {
		if parent, parentKey, err = authority.Mint(authority.MintRequest{
			TrustDomain: m.cfg.TrustDomain, Now: now, Lifetime: m.cfg.RootLifetime, Backdate: m.cfg.Backdate,
		}); err != nil {
			return fmt.Errorf("rotation: %w", err)
		}
	} else {
		roots, err := pemutil.ParseCertificateBundle(active[authority.RootCertFile])
		if err != nil || len(roots) == 0 {
			return fmt.Errorf("rotation: active root: %v", err)
		}
		parent = roots[0]
		if parentKey, err = authority.SignerFromPEM(ctx, active[authority.RootKeyFile]); err != nil {
			return fmt.Errorf("rotation: the active generation has no usable root key: %w", err)
		}
	}
	inter, interKey, err := authority.Mint(authority.MintRequest{
		TrustDomain: m.cfg.TrustDomain, Parent: parent, ParentKey: parentKey,
		Now: now, Lifetime: m.cfg.IntermediateLifetime, Backdate: m.cfg.Backdate,
	})
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	n := st.LastGeneration + 1
	files, err := authority.GenerationFiles(parent, parentKey, inter, interKey)
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	for name, data := range files {
		snap.Files[genPrefix(n)+name] = data
	}
	st.Next, st.NextIsRoot, st.PreparedAt, st.LastGeneration = n, root, now, n
	if err := m.write(ctx, snap, st); err != nil {
		return err
	}
	role := "intermediate"
	if root {
		role = "root"
		if err := m.record(ctx, "prepare", "root", parent, now); err != nil {
			return err
		}
	}
	m.cfg.Log.Info("prepared the next CA", "role", role, "generation", n, "intermediate", inter.SerialNumber.Text(16))
	return m.record(ctx, "prepare", "intermediate", inter, now)
}

// Stage prepares operator-supplied material (Istio's cacerts layout in
// dir, the key in dir's ca-key.pem or at keyURI) as the next CA, as Prepare
// does for self-managed material: its roots join the trust bundle now, and
// it signs only once activated. The key is referenced, never copied.
func (m *Manager) Stage(ctx context.Context, dir, keyURI string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	if st.Next != 0 {
		return ErrAlreadyPrepared
	}
	files, err := authority.ReadCACerts(dir, keyURI)
	if err != nil {
		return err
	}
	mat, err := authority.LoadFiles(ctx, files, "", now)
	if err != nil {
		return fmt.Errorf("rotation: the staged CA in %s is not usable: %w", dir, err)
	}
	active, err := authority.LoadFiles(ctx, genFiles(snap, st.Active), "", now)
	if err != nil {
		return fmt.Errorf("rotation: active generation: %w", err)
	}
	newRoot := mat.Anchor != nil && (active.Anchor == nil || !mat.Anchor.Equal(active.Anchor))
	n := st.LastGeneration + 1
	for name, data := range files {
		snap.Files[genPrefix(n)+name] = data
	}
	st.Next, st.NextIsRoot, st.PreparedAt, st.LastGeneration = n, newRoot, now, n
	if err := m.write(ctx, snap, st); err != nil {
		return err
	}
	if newRoot {
		if err := m.record(ctx, "prepare", "root", mat.Anchor, now); err != nil {
			return err
		}
	}
	m.cfg.Log.Info("staged operator-supplied CA", "dir", dir, "generation", n, "new_root", newRoot)
	return m.record(ctx, "prepare", "intermediate", mat.Cert, now)
}

// Adopt makes operator-supplied material the first generation when there is
// no rotation state yet. Later starts keep the state in force; a different
// directory is staged with Stage and switched to with Activate.
func (m *Manager) Adopt(ctx context.Context, dir, keyURI string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	snap, err := m.cfg.Store.Read(ctx)
	if err != nil {
		return err
	}
	files, err := authority.ReadCACerts(dir, keyURI)
	if err != nil {
		return err
	}
	if _, ok := snap.Files[stateFile]; ok {
		st, err := parseState(snap.Files[stateFile])
		if err != nil {
			return err
		}
		if string(genFiles(snap, st.Active)[authority.CACertFile]) != string(files[authority.CACertFile]) {
			m.cfg.Log.Warn("the --cacerts directory differs from the CA in force; stage it with trustmesh ca rotate --prepare --cacerts DIR",
				"dir", dir, "active_generation", st.Active)
		}
		return nil
	}
	if _, err := authority.LoadFiles(ctx, files, "", m.cfg.Clock.Now()); err != nil {
		return fmt.Errorf("rotation: operator-supplied CA in %s: %w", dir, err)
	}
	for name, data := range files {
		snap.Files[genPrefix(1)+name] = data
	}
	err = m.write(ctx, snap, State{Active: 1, LastGeneration: 1})
	if errors.Is(err, ErrConflict) {
		return nil // another replica adopted it first
	}
	return err
}

// Activate makes the prepared CA the one that signs. After a root rotation
// the old roots stay in the bundle for MaxWorkloadTTL (plus a margin), until
// everything signed under them has expired. A new root is activated only
// once it has been in the bundle for the root propagation time, unless
// force is set.
func (m *Manager) Activate(ctx context.Context, force bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	if st.Next == 0 {
		return ErrNothingPrepared
	}
	propagation := m.cfg.RootPropagation
	if m.cfg.FromCLI && st.RootPropagation > 0 {
		propagation = st.RootPropagation
	}
	if st.NextIsRoot && !force && now.Before(st.PreparedAt.Add(propagation)) {
		return fmt.Errorf("%w: prepared %s ago, activate after %s (or force it once every agent has the new root)",
			ErrTooEarly, now.Sub(st.PreparedAt).Round(time.Second), propagation)
	}
	next, err := authority.LoadFiles(ctx, genFiles(snap, st.Next), "", now)
	if err != nil {
		return fmt.Errorf("rotation: the prepared CA is not usable: %w", err)
	}
	if st.NextIsRoot {
		old, err := pemutil.ParseCertificateBundle(genFiles(snap, st.Active)[authority.RootCertFile])
		if err != nil {
			return fmt.Errorf("rotation: %w", err)
		}
		keep := m.cfg.MaxWorkloadTTL
		if st.RetireAfter > keep {
			keep = st.RetireAfter
		}
		until := now.Add(keep + time.Hour)
		for _, r := range old {
			st.Retiring = append(st.Retiring, Retiring{CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})), Until: until})
		}
	}
	st.Active, st.Next, st.NextIsRoot, st.PreparedAt, st.ActivatedAt = st.Next, 0, false, time.Time{}, now
	if err := m.write(ctx, snap, st); err != nil {
		return err
	}
	m.cfg.Log.Info("activated the next CA", "generation", st.Active, "intermediate", next.Cert.SerialNumber.Text(16))
	if err := m.record(ctx, "activate", "intermediate", next.Cert, now); err != nil {
		return err
	}
	if next.Anchor != nil {
		return m.record(ctx, "activate", "root", next.Anchor, now)
	}
	return nil
}

func (m *Manager) record(ctx context.Context, step, role string, c *x509.Certificate, now time.Time) error {
	if m.cfg.Recorder == nil {
		return nil
	}
	return m.cfg.Recorder.RecordRotation(ctx, journal.Rotation{Time: now, Step: step, Role: role,
		Serial: c.SerialNumber.Text(16), Subject: c.Subject.CommonName, NotAfter: c.NotAfter})
}

// Tick applies the automatic policy at the current time: prepare, activate,
// and drop retired roots whose time has passed.
func (m *Manager) Tick(ctx context.Context) error {
	now := m.cfg.Clock.Now()
	mat, st, err := m.Material(ctx, now)
	if err != nil {
		return err
	}
	inter := mat.Cert
	life := inter.NotAfter.Sub(inter.NotBefore)
	root := mat.Anchor
	snap, _, err := m.read(ctx)
	if err != nil {
		return err
	}
	if _, selfManaged := genFiles(snap, st.Active)[authority.RootKeyFile]; !selfManaged {
		// Operator-supplied material is rotated by its operator (Stage and
		// Activate); only retirements are automatic.
		if st.Next != 0 && (!st.NextIsRoot || !now.Before(st.PreparedAt.Add(m.cfg.RootPropagation))) {
			return m.Activate(ctx, false)
		}
		return m.retire(ctx, now)
	}
	switch {
	case st.Next == 0 && root != nil && now.After(root.NotAfter.Add(-m.cfg.RootLifetime/5)):
		return m.Prepare(ctx, true)
	case st.Next == 0 && now.After(inter.NotBefore.Add(life/2)):
		return m.Prepare(ctx, false)
	case st.Next != 0 && st.NextIsRoot && !now.Before(st.PreparedAt.Add(m.cfg.RootPropagation)):
		return m.Activate(ctx, false)
	case st.Next != 0 && !st.NextIsRoot && now.After(inter.NotBefore.Add(2*life/3)):
		return m.Activate(ctx, false)
	}
	return m.retire(ctx, now)
}

func (m *Manager) retire(ctx context.Context, now time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	kept := st.Retiring[:0:0]
	for _, r := range st.Retiring {
		if now.Before(r.Until) {
			kept = append(kept, r)
			continue
		}
		if c, err := pemutil.ParseCertificate([]byte(r.CertPEM)); err == nil {
			if err := m.record(ctx, "retire", "root", c, now); err != nil {
				return err
			}
		}
	}
	if len(kept) == len(st.Retiring) {
		return nil
	}
	st.Retiring = kept
	return m.write(ctx, snap, st)
}

// Run reloads the material whenever the state changes (including changes
// made by `trustmesh ca rotate` in another process) and, when Automatic,
// applies the policy on every interval, on the leader only.
func (m *Manager) Run(ctx context.Context, apply func(*authority.Material)) error {
	t := m.cfg.Clock.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		if m.cfg.Automatic && (m.cfg.IsLeader == nil || m.cfg.IsLeader()) {
			if err := m.Tick(ctx); err != nil {
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
