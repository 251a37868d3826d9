package rotation

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/trace"
	"go.step.sm/crypto/pemutil"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// Errors callers branch on.
var (
	ErrAlreadyPrepared = errors.New("rotation: a next CA is already prepared; activate it first")
	ErrNothingPrepared = errors.New("rotation: no next CA is prepared")
	// ErrNoCA is returned to an operator's manager (Open) when the store
	// holds no CA: only a serving control plane creates one.
	ErrNoCA = errors.New("rotation: no CA here (serve creates it; with serve --ca-secret, name the Secret)")
	// ErrTooEarly refuses to activate a new root before it has had time to
	// reach every agent through the bundle stream.
	ErrTooEarly = errors.New("rotation: the prepared root has not been in the trust bundle long enough")
	// ErrNotServing is returned when an operator's manager is asked to run
	// the automatic policy, which only the serving control plane runs.
	ErrNotServing = errors.New("rotation: an operator's manager does not run the rotation policy")
)

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
	// root live, so how long it stays in the bundle, and how long before
	// its end a CA certificate is replaced. Default 24h.
	MaxWorkloadTTL time.Duration
	// IntermediateLifetime and RootLifetime of new CA certificates.
	// Defaults authority.IntermediateLifetime and authority.RootLifetime.
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
	// TracerProvider, when set, traces each step the policy takes
	// (ca.rotation.step). Nil turns tracing off.
	TracerProvider trace.TracerProvider
}

func (c Config) withDefaults() Config {
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.IntermediateLifetime == 0 {
		c.IntermediateLifetime = authority.IntermediateLifetime
	}
	if c.RootLifetime == 0 {
		c.RootLifetime = authority.RootLifetime
	}
	if c.Backdate == 0 {
		c.Backdate = authority.DefaultBackdate
	}
	if c.RootPropagation == 0 {
		c.RootPropagation = 24 * time.Hour
	}
	if c.Interval == 0 {
		c.Interval = time.Minute
	}
	if c.MaxWorkloadTTL == 0 {
		c.MaxWorkloadTTL = 24 * time.Hour
	}
	return c
}

// Policy is the rotation policy c configures, defaults applied.
func (c Config) Policy() Policy {
	c = c.withDefaults()
	return Policy{
		IntermediateLifetime: c.IntermediateLifetime, RootLifetime: c.RootLifetime,
		RootPropagation: c.RootPropagation, MaxWorkloadTTL: c.MaxWorkloadTTL,
		Backdate: c.Backdate, Interval: c.Interval,
	}
}

// Validate checks c as New does, collecting every error: where the CA is
// kept, and that the policy keeps the cut-short rule (Policy.Validate).
func (c Config) Validate() error {
	var errs []error
	if c.Store == nil && c.Dir == "" {
		errs = append(errs, errors.New("rotation: a store or a directory is required"))
	}
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("rotation: a trust domain is required"))
	}
	if err := c.Policy().Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Manager owns the CA's rotation state in a Store.
type Manager struct {
	cfg    Config
	policy Policy
	// serving is set for the serving control plane's manager (New), which
	// creates the first generation and records its policy in the state; an
	// operator's manager (Open) does neither.
	serving bool
	mu      sync.Mutex
	// lastSeen is what Reload applied last.
	lastSeen []byte
	// tracer is nil when tracing is off.
	tracer trace.Tracer
	// jmu guards index, what the journal says about rotation (taint.go).
	jmu   sync.Mutex
	index *journalIndex
}

// New returns the serving control plane's Manager. It creates the first
// generation on first use, records its retirement and propagation times in
// the state for operators, and runs the policy (Run). cfg is validated.
func New(cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Store == nil {
		if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("rotation: %w", err)
		}
		cfg.Store = DirStore{Dir: cfg.Dir}
	}
	m := &Manager{cfg: cfg, policy: cfg.Policy(), serving: true}
	if cfg.TracerProvider != nil {
		m.tracer = cfg.TracerProvider.Tracer(TracerName)
	}
	return m, nil
}

// Open returns an operator's Manager, for rotating by hand and for reading
// the CA (trustmesh ca rotate, the trust bundle, audits). It never creates
// a CA, nor its directory: where there is none it returns ErrNoCA, so that
// a command pointed at the wrong place cannot print or rotate a CA nobody
// serves. It honours the retirement and propagation times the serving
// control plane recorded in the state over its own defaults, and it does
// not run the policy (ErrNotServing).
func Open(cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	if cfg.Store == nil {
		if cfg.Dir == "" {
			return nil, errors.New("rotation: a store or a directory is required")
		}
		cfg.Store = DirStore{Dir: cfg.Dir}
	}
	return &Manager{cfg: cfg, policy: cfg.Policy()}, nil
}

// read returns the current snapshot and state. When there is none, a
// serving manager creates the first generation (exactly once, even with
// several replicas starting together) and an operator's returns ErrNoCA.
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
		if !m.serving {
			return Snapshot{}, State{}, ErrNoCA
		}
		files, err := authority.NewSelfManagedFiles(m.cfg.TrustDomain, m.cfg.Clock.Now(), authority.Lifetimes{
			Root: m.policy.RootLifetime, Intermediate: m.policy.IntermediateLifetime, Backdate: m.policy.Backdate,
		})
		if err != nil {
			return Snapshot{}, State{}, err
		}
		putGeneration(snap, 1, files)
		err = m.write(ctx, snap, State{Active: 1, LastGeneration: 1})
		if errors.Is(err, ErrConflict) && attempt < 3 {
			continue // another replica created it first: use theirs
		}
		if err != nil {
			return Snapshot{}, State{}, err
		}
	}
}

// write replaces the state. The serving manager records its retirement and
// propagation times in it.
func (m *Manager) write(ctx context.Context, snap Snapshot, st State) error {
	if m.serving {
		st.RetireAfter = max(st.RetireAfter, m.policy.MaxWorkloadTTL)
		st.RootPropagation = m.policy.RootPropagation
		st.IntermediateLifetime, st.RootLifetime = m.policy.IntermediateLifetime, m.policy.RootLifetime
	}
	b, err := encodeState(st)
	if err != nil {
		return err
	}
	snap.Files[stateFile] = b
	return m.cfg.Store.Write(ctx, snap)
}

// rootPropagation is how long a prepared root waits: the serving manager's
// own policy, or for an operator's the time the serving one recorded.
func (m *Manager) rootPropagation(st State) time.Duration {
	if !m.serving && st.RootPropagation > 0 {
		return st.RootPropagation
	}
	return m.policy.RootPropagation
}

// minRecordedLifetime is the shortest recorded intermediate lifetime an
// operator's manager mints with; the shortest serve's own policy accepts
// in tests is a minute.
const minRecordedLifetime = time.Minute

// lifetimes returns how long new CA certificates live: the serving
// manager's own policy, or for an operator's the lifetimes the serving one
// recorded.
//
// Recorded lifetimes are checked before use, as far as the state allows
// (serve validated them against its whole policy, which is not recorded):
// an intermediate must live at least minRecordedLifetime, and a root longer
// than its intermediate. A state that says otherwise was edited or
// damaged, and minting from it would activate a CA certificate that is
// dead at once.
func (m *Manager) lifetimes(st State) (intermediate, root time.Duration, err error) {
	intermediate, root = m.policy.IntermediateLifetime, m.policy.RootLifetime
	if m.serving {
		return intermediate, root, nil
	}
	if st.IntermediateLifetime < 0 || st.RootLifetime < 0 {
		return 0, 0, fmt.Errorf("%w: %s records a negative CA lifetime; %s", ErrCorruptState, stateFile, restoreHint)
	}
	if st.IntermediateLifetime > 0 {
		intermediate = st.IntermediateLifetime
	}
	if st.RootLifetime > 0 {
		root = st.RootLifetime
	}
	if intermediate < minRecordedLifetime {
		return 0, 0, fmt.Errorf("%w: %s records an intermediate lifetime of %s, under %s; %s", ErrCorruptState, stateFile, intermediate, minRecordedLifetime, restoreHint)
	}
	if root <= intermediate {
		return 0, 0, fmt.Errorf("%w: %s records a root lifetime of %s, not longer than the intermediate's %s; %s", ErrCorruptState, stateFile, root, intermediate, restoreHint)
	}
	return intermediate, root, nil
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
	mat, st, _, err := m.material(ctx, now, func(files map[string][]byte) (*authority.Material, error) {
		return authority.LoadFiles(ctx, files, "", now)
	})
	return mat, st, err
}

// Certificates is Material without the key and without judging the
// certificates at now: what the trust bundle and the rotation audit read.
// It needs no access to the key, and still answers for a CA that has
// expired or is not yet valid, which is what an audit must report.
func (m *Manager) Certificates(ctx context.Context, now time.Time) (*authority.Material, State, error) {
	mat, st, _, err := m.material(ctx, now, authority.ReadCertificates)
	return mat, st, err
}

func (m *Manager) material(ctx context.Context, now time.Time, load func(map[string][]byte) (*authority.Material, error)) (*authority.Material, State, Snapshot, error) {
	snap, st, err := m.read(ctx)
	if err != nil {
		return nil, State{}, Snapshot{}, err
	}
	mat, err := load(genFiles(snap, st.Active))
	if err != nil {
		return nil, State{}, Snapshot{}, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
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
			return nil, State{}, Snapshot{}, fmt.Errorf("rotation: prepared generation: %w", err)
		}
		for _, r := range roots {
			add(r)
		}
	}
	for _, t := range st.Tainted {
		c, err := t.Cert()
		if err != nil {
			return nil, State{}, Snapshot{}, err
		}
		mat.Tainted = append(mat.Tainted, c)
		if t.Role == RoleRoot {
			add(c)
		}
	}
	for _, r := range st.Retiring {
		if !now.Before(r.Until) {
			continue
		}
		c, err := pemutil.ParseCertificate([]byte(r.CertPEM))
		if err != nil {
			return nil, State{}, Snapshot{}, fmt.Errorf("rotation: retiring root: %w", err)
		}
		add(c)
	}
	return mat, st, snap, nil
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
	files, parent, inter, err := m.mint(ctx, snap, st, root, now)
	if err != nil {
		return err
	}
	n := st.LastGeneration + 1
	stepGeneration(ctx, n)
	putGeneration(snap, n, files)
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

// mint creates the next CA's files: an intermediate under the active root,
// or with root set, a new root and an intermediate under it.
func (m *Manager) mint(ctx context.Context, snap Snapshot, st State, root bool, now time.Time) (map[string][]byte, *x509.Certificate, *x509.Certificate, error) {
	active := genFiles(snap, st.Active)
	interLife, rootLife, err := m.lifetimes(st)
	if err != nil {
		return nil, nil, nil, err
	}
	var (
		parent    *x509.Certificate
		parentKey crypto.Signer
	)
	if root {
		if parent, parentKey, err = authority.Mint(authority.MintRequest{
			TrustDomain: m.cfg.TrustDomain, Now: now, Lifetime: rootLife, Backdate: m.policy.Backdate,
		}); err != nil {
			return nil, nil, nil, fmt.Errorf("rotation: %w", err)
		}
	} else {
		roots, err := pemutil.ParseCertificateBundle(active[authority.RootCertFile])
		if err != nil || len(roots) == 0 {
			return nil, nil, nil, fmt.Errorf("rotation: active root: %v", err)
		}
		parent = roots[0]
		selfManaged, err := authority.SelfManaged(active)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
		}
		if !selfManaged {
			return nil, nil, nil, fmt.Errorf("rotation: generation %d is operator-supplied (its key is named by %s, and no %s is held), so trustmesh cannot mint the next intermediate; stage one with trustmesh ca rotate --prepare --cacerts DIR",
				st.Active, authority.CAKeyURIFile, authority.RootKeyFile)
		}
		if parentKey, err = authority.SignerFromPEM(ctx, active[authority.RootKeyFile]); err != nil {
			return nil, nil, nil, fmt.Errorf("rotation: generation %d: %s is not a usable root key: %w", st.Active, authority.RootKeyFile, err)
		}
	}
	inter, interKey, err := authority.Mint(authority.MintRequest{
		TrustDomain: m.cfg.TrustDomain, Parent: parent, ParentKey: parentKey,
		Now: now, Lifetime: interLife, Backdate: m.policy.Backdate,
	})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("rotation: %w", err)
	}
	files, err := authority.GenerationFiles(parent, parentKey, inter, interKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("rotation: %w", err)
	}
	return files, parent, inter, nil
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
	putGeneration(snap, n, files)
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
	putGeneration(snap, 1, files)
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
	propagation := m.rootPropagation(st)
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
		until := now.Add(max(m.policy.MaxWorkloadTTL, st.RetireAfter) + time.Hour)
		for _, r := range old {
			st.Retiring = append(st.Retiring, Retiring{CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})), Until: until})
		}
	}
	st.Active, st.Next, st.NextIsRoot, st.PreparedAt, st.ActivatedAt = st.Next, 0, false, time.Time{}, now
	stepGeneration(ctx, st.Active)
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

// Retire drops the retiring roots whose time has passed from the bundle.
func (m *Manager) Retire(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Clock.Now()
	snap, st, err := m.read(ctx)
	if err != nil {
		return err
	}
	stepGeneration(ctx, st.Active)
	kept := st.Retiring[:0:0]
	for _, r := range st.Retiring {
		if now.Before(r.Until) {
			kept = append(kept, r)
			continue
		}
		if c, err := pemutil.ParseCertificate([]byte(r.CertPEM)); err == nil {
			// Recorded before the state is written, so only once: a crash
			// between the two retires it again without a second record.
			done, err := m.recorded(ctx, "retire", RoleRoot, c)
			if err != nil {
				return err
			}
			if done {
				continue
			}
			if err := m.record(ctx, "retire", RoleRoot, c, now); err != nil {
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

func (m *Manager) record(ctx context.Context, step, role string, c *x509.Certificate, now time.Time) error {
	if m.cfg.Recorder == nil {
		return nil
	}
	return m.cfg.Recorder.RecordRotation(ctx, journal.Rotation{Time: now, Step: step, Role: role,
		Serial: c.SerialNumber.Text(16), Subject: c.Subject.CommonName, NotAfter: c.NotAfter})
}

// Tick applies the policy once at the current time: it decides
// (Policy.Decide) and takes the step decided, returning it.
func (m *Manager) Tick(ctx context.Context) (_ Action, err error) {
	if !m.serving {
		return Nothing, ErrNotServing
	}
	// A step the state shows but the journal lacks (a crash between the
	// two) is recorded before anything else is done.
	if err := m.Reconcile(ctx); err != nil {
		return Nothing, err
	}
	now := m.cfg.Clock.Now()
	mat, st, snap, err := m.material(ctx, now, func(files map[string][]byte) (*authority.Material, error) {
		return authority.LoadFiles(ctx, files, "", now)
	})
	if err != nil {
		return Nothing, err
	}
	a := Active{Intermediate: Validity{mat.Cert.NotBefore, mat.Cert.NotAfter}}
	if mat.Anchor != nil {
		a.Root = Validity{mat.Anchor.NotBefore, mat.Anchor.NotAfter}
	}
	if a.SelfManaged, err = authority.SelfManaged(genFiles(snap, st.Active)); err != nil {
		return Nothing, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
	}
	action := m.policy.Decide(now, st, a)
	if action != Nothing {
		var span trace.Span
		ctx, span = m.startStep(ctx, action)
		defer func() { endStep(span, err) }()
	}
	switch action {
	case PrepareIntermediate:
		err = m.Prepare(ctx, false)
	case PrepareRoot:
		err = m.Prepare(ctx, true)
	case Activate:
		err = m.Activate(ctx, false)
	case Retire:
		err = m.Retire(ctx)
	}
	if err == nil {
		err = m.RetireTainted(ctx)
	}
	return action, err
}
