// Package witness is a transparency-log witness for the CA's journal: it
// keeps, in a directory of its own, every checkpoint it accepted from each
// log, and accepts a newer one only when the log's key signed it and a
// consistency proof shows it extends the last one accepted. It refuses, and
// keeps as evidence, a rollback (a smaller tree than accepted), a fork (a
// different tree of the same size, or one the proof does not join to the
// accepted history) and a split view (two sources showing different trees
// of the same size). It cosigns what it accepts in the C2SP
// tlog-cosignature format, and answers the C2SP tlog-witness add-checkpoint
// API (see Handler), so that an existing witness network's clients can use
// it, and it can stand beside one.
package witness

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// Errors a checkpoint is refused with. Each maps to a tlog-witness status
// (see Handler).
var (
	// ErrUnknownLog: no log with the checkpoint's origin was added.
	ErrUnknownLog = errors.New("witness: unknown log origin")
	// ErrBadSignature: the checkpoint is not signed by its log's key.
	ErrBadSignature = errors.New("witness: the checkpoint is not signed by the log's key")
	// ErrMalformed: the request or the checkpoint does not parse.
	ErrMalformed = errors.New("witness: malformed checkpoint or proof")
)

// ConflictError says the caller's old size is not the witness's latest
// accepted size: it must prove consistency from Latest instead. Nothing is
// wrong with the log.
type ConflictError struct{ Latest uint64 }

func (e *ConflictError) Error() string {
	return fmt.Sprintf("witness: the latest accepted size is %d", e.Latest)
}

// Refusal kinds: what a refused checkpoint shows about the log.
const (
	// KindRollback: a smaller tree than one already accepted.
	KindRollback = "rollback"
	// KindFork: a different tree of an accepted size, or a larger tree that
	// no consistency proof joins to the accepted one.
	KindFork = "fork"
	// KindSplitView: two sources show different trees of the same size.
	KindSplitView = "split-view"
)

// RefusedError says the log showed a history that contradicts what the
// witness accepted. The checkpoint is kept as evidence in Evidence.
type RefusedError struct {
	Kind     string
	Origin   string
	Accepted journal.Checkpoint
	Offered  journal.Checkpoint
	Detail   string
	Evidence string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("witness: %s of %s: %s", e.Kind, e.Origin, e.Detail)
}

// Witness is the state in one directory. Only one process may hold it.
type Witness struct {
	dir    string
	clock  func() time.Time
	lock   *os.File
	signer *cosigner

	mu   sync.Mutex
	logs map[string]*logState // by origin
}

type logState struct {
	origin   string
	vkey     string
	verifier note.Verifier
	dir      string
	latest   journal.Checkpoint // Size 0 and nil Root before the first
	haveAny  bool
}

// Open opens (creating on first use) the witness directory dir. name is
// the witness's key name, used only when the key is created. clock is the
// time of cosignatures.
func Open(dir, name string, clock func() time.Time) (*Witness, error) {
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o700); err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("witness: another process holds %s: %w", dir, err)
	}
	signer, err := loadOrCreateCosigner(dir, name)
	if err != nil {
		lock.Close()
		return nil, err
	}
	return &Witness{dir: dir, clock: clock, lock: lock, signer: signer, logs: map[string]*logState{}}, nil
}

// Close releases the directory.
func (w *Witness) Close() error { return w.lock.Close() }

// VerifierKey is the witness's cosignature verifier key (note's
// name+hash+base64 form, algorithm 0x04).
func (w *Witness) VerifierKey() string { return w.signer.vkey }

// AddLog makes the witness follow the log whose checkpoint verifier key is
// vkey, loading what it accepted before. The key is recorded on first use;
// a different key for an origin already followed is refused: a log's key
// does not change quietly. An empty vkey uses the recorded one.
func (w *Witness) AddLog(origin, vkey string) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if vkey != "" {
		v, err := note.NewVerifier(vkey)
		if err != nil {
			return "", fmt.Errorf("witness: log key: %w", err)
		}
		origin = v.Name()
	}
	if origin == "" {
		return "", errors.New("witness: give the log's checkpoint key")
	}
	if l, ok := w.logs[origin]; ok {
		if vkey != "" && vkey != l.vkey {
			return "", fmt.Errorf("witness: %s is followed with another key", origin)
		}
		return origin, nil
	}
	ldir := filepath.Join(w.dir, "logs", logID(origin))
	keyPath := filepath.Join(ldir, "key")
	recorded, err := os.ReadFile(keyPath)
	switch {
	case err == nil:
		r := strings.TrimSpace(string(recorded))
		if vkey != "" && r != vkey {
			return "", fmt.Errorf("witness: %s was followed with the key %s; this key differs: a log's key does not change quietly (move %s away to start over)", origin, r, ldir)
		}
		vkey = r
	case errors.Is(err, os.ErrNotExist):
		if vkey == "" {
			return "", fmt.Errorf("witness: %s is not followed yet: give its checkpoint key", origin)
		}
		if err := os.MkdirAll(ldir, 0o700); err != nil {
			return "", fmt.Errorf("witness: %w", err)
		}
		if err := atomicfile.WriteFile(keyPath, []byte(vkey+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("witness: %w", err)
		}
	default:
		return "", fmt.Errorf("witness: %w", err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return "", fmt.Errorf("witness: recorded key of %s: %w", origin, err)
	}
	l := &logState{origin: origin, vkey: vkey, verifier: v, dir: ldir}
	if err := l.load(); err != nil {
		return "", err
	}
	w.logs[origin] = l
	return origin, nil
}

// logID names a log's directory: origins may hold slashes.
func logID(origin string) string {
	h := sha256.Sum256([]byte(origin))
	return hex.EncodeToString(h[:8])
}

const historySuffix = ".checkpoint"

// load reads the accepted history and takes its largest checkpoint as the
// latest, checking each against the log's key: a history file that does not
// verify is an error, never skipped.
func (l *logState) load() error {
	names, err := filepath.Glob(filepath.Join(l.dir, "history", "*"+historySuffix))
	if err != nil {
		return fmt.Errorf("witness: %w", err)
	}
	sort.Strings(names) // zero-padded sizes sort numerically
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return fmt.Errorf("witness: %w", err)
		}
		cp, err := journal.ParseCheckpoint(b, l.vkey)
		if err != nil {
			return fmt.Errorf("witness: history file %s: %w", n, err)
		}
		if want := historyName(cp.Size); filepath.Base(n) != want {
			return fmt.Errorf("witness: history file %s holds a checkpoint of size %d", n, cp.Size)
		}
		if l.haveAny && cp.Size <= l.latest.Size {
			return fmt.Errorf("witness: history file %s is out of order", n)
		}
		l.latest, l.haveAny = cp, true
	}
	return nil
}

func historyName(size uint64) string { return fmt.Sprintf("%020d%s", size, historySuffix) }

// Latest returns the latest checkpoint accepted for origin, and whether
// there is one.
func (w *Witness) Latest(origin string) (journal.Checkpoint, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.logs[origin]
	if !ok {
		return journal.Checkpoint{}, false
	}
	return l.latest, l.haveAny
}

// History returns the sizes of every checkpoint accepted for origin, in
// order.
func (w *Witness) History(origin string) ([]uint64, error) {
	names, err := filepath.Glob(filepath.Join(w.dir, "logs", logID(origin), "history", "*"+historySuffix))
	if err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	sort.Strings(names)
	sizes := make([]uint64, 0, len(names))
	for _, n := range names {
		s, err := strconv.ParseUint(strings.TrimSuffix(filepath.Base(n), historySuffix), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("witness: history file %s: %w", n, err)
		}
		sizes = append(sizes, s)
	}
	return sizes, nil
}

// open verifies signed with its log's key.
func (w *Witness) open(signed []byte) (*logState, journal.Checkpoint, error) {
	first, _, _ := bytes.Cut(signed, []byte("\n"))
	l, ok := w.logs[string(first)]
	if !ok {
		return nil, journal.Checkpoint{}, fmt.Errorf("%w %q", ErrUnknownLog, first)
	}
	cp, err := journal.ParseCheckpoint(signed, l.vkey)
	if err != nil {
		var unverified *note.UnverifiedNoteError
		var invalid *note.InvalidSignatureError
		if errors.As(err, &unverified) || errors.As(err, &invalid) {
			return nil, journal.Checkpoint{}, fmt.Errorf("%w: %v", ErrBadSignature, err)
		}
		return nil, journal.Checkpoint{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return l, cp, nil
}

// Add offers the witness signed, a checkpoint, with a consistency proof
// from oldSize, the size the caller believes the witness accepted last
// (tlog-witness's add-checkpoint). It returns the witness's cosignature
// line when it accepts. It refuses with ErrUnknownLog, ErrBadSignature,
// ErrMalformed, a *ConflictError (oldSize is not the latest accepted size)
// or a *RefusedError (a rollback or a fork, kept as evidence). An accepted
// checkpoint larger than the last is written to the history before Add
// returns; an offer of the latest again is cosigned and not written twice.
func (w *Witness) Add(signed []byte, oldSize uint64, consistency [][]byte) ([]byte, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, cp, err := w.open(signed)
	if err != nil {
		return nil, err
	}
	refuse := func(kind, detail string) error {
		e := &RefusedError{Kind: kind, Origin: l.origin, Accepted: l.latest, Offered: cp, Detail: detail}
		e.Evidence = w.keepEvidence(l, kind, signed)
		return e
	}
	// The order is C2SP tlog-witness's: an old size beyond the checkpoint
	// is refused (400), then an old size that is not the latest accepted
	// gets the latest (409), and only then is the tree compared (422).
	switch {
	case oldSize > cp.Size && cp.Size < l.latest.Size:
		return nil, refuse(KindRollback, fmt.Sprintf("offered size %d is smaller than the accepted %d", cp.Size, l.latest.Size))
	case oldSize > cp.Size:
		return nil, fmt.Errorf("%w: old size %d is beyond the checkpoint's %d", ErrMalformed, oldSize, cp.Size)
	case oldSize != l.latest.Size:
		return nil, &ConflictError{Latest: l.latest.Size}
	case l.haveAny && cp.Size == l.latest.Size && !bytes.Equal(cp.Root, l.latest.Root):
		return nil, refuse(KindFork, fmt.Sprintf("a different root hash for the accepted size %d", cp.Size))
	case l.haveAny && cp.Size == l.latest.Size:
		return w.signer.cosign(cp, w.clock())
	}
	if l.haveAny && l.latest.Size > 0 {
		if err := proof.VerifyConsistency(rfc6962.DefaultHasher, l.latest.Size, cp.Size, consistency, l.latest.Root, cp.Root); err != nil {
			return nil, refuse(KindFork, fmt.Sprintf("no consistency from the accepted size %d to %d: %v", l.latest.Size, cp.Size, err))
		}
	}
	path := filepath.Join(l.dir, "history", historyName(cp.Size))
	if _, err := os.Stat(path); err == nil {
		return nil, fmt.Errorf("witness: %s exists: the history is append-only", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	if err := atomicfile.WriteFile(path, signed, 0o600); err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	l.latest, l.haveAny = cp, true
	return w.signer.cosign(cp, w.clock())
}

// maxEvidence bounds the refused checkpoints kept per log: anyone who can
// reach /add-checkpoint can replay the log's public, validly signed old
// checkpoints, and each would otherwise be a file.
const maxEvidence = 256

// keepEvidence writes a refused checkpoint beside the history, and returns
// its path ("" when it could not be written, or maxEvidence are kept
// already; the refusal stands and is counted either way). A checkpoint
// already kept is not written again.
func (w *Witness) keepEvidence(l *logState, kind string, signed []byte) string {
	sum := sha256.Sum256(signed)
	dir := filepath.Join(l.dir, "refused")
	name := fmt.Sprintf("-%s-%s%s", kind, hex.EncodeToString(sum[:8]), historySuffix)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return ""
	}
	kept, err := os.ReadDir(dir)
	if err != nil {
		return ""
	}
	for _, e := range kept {
		if strings.HasSuffix(e.Name(), name) {
			return filepath.Join(dir, e.Name())
		}
	}
	if len(kept) >= maxEvidence {
		return ""
	}
	path := filepath.Join(dir, w.clock().UTC().Format("20060102T150405Z")+name)
	if err := atomicfile.WriteFile(path, signed, 0o600); err != nil {
		return ""
	}
	return path
}
