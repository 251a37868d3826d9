package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// Witness receives signed checkpoints as they are published. Offer must not
// block the commit path.
type Witness interface {
	Offer(signed []byte)
}

// ExportWitness keeps a copy of the latest checkpoint outside the data
// directory: in a file (replaced atomically), or at a C2SP tlog-witness
// (an http(s) URL, its submission prefix) that cosigns it after checking a
// consistency proof from the last size it cosigned. Once a checkpoint is
// out there, whoever owns the database cannot rewrite or cut the history it
// covers without the witness refusing or `trustmesh audit verify
// --checkpoint` noticing. Exports happen off the commit path; only the
// newest pending checkpoint is kept, since it covers all earlier ones.
//
// A witness that refuses, or cannot be reached, never stops issuance (as a
// Certificate Transparency log goes on logging while a monitor is down):
// the failure is logged, counted (Collect), shown in Status, and the next
// checkpoint is offered again.
type ExportWitness struct {
	cfg    ExportConfig
	client *http.Client

	mu      sync.Mutex
	pending []byte
	wake    chan struct{}
	status  WitnessStatus
	prover  Prover
	// witnessSize is the size the witness last cosigned, as far as this
	// process knows; 0 until it cosigns or tells us (409).
	witnessSize uint64
	failures    map[string]uint64
}

// ExportConfig configures an ExportWitness.
type ExportConfig struct {
	// Target is a file path or the http(s) URL of a tlog-witness: the
	// checkpoint is POSTed to Target + "/add-checkpoint".
	Target string
	// Key is the witness's cosignature/v1 verifier key. With a URL target,
	// every cosignature the witness returns is verified with it, and kept
	// in Cosigned; without it, the witness's cosignature is not trusted and
	// not kept (its answer still tells that it accepted the checkpoint).
	Key string
	// Cosigned is the file where the latest checkpoint the witness cosigned
	// is kept, with the cosignature beside the log's signature (a signed
	// note `trustmesh audit verify --checkpoint` reads). Empty keeps none.
	Cosigned string
	Log      *slog.Logger
	// Now is the clock; nil is time.Now.
	Now func() time.Time
}

// Prover proves a log's consistency between two sizes (Store is one).
type Prover interface {
	ConsistencyBetween(ctx context.Context, size1, size2 uint64) ([][]byte, error)
}

// WitnessStatus is how the exports to the witness went.
type WitnessStatus struct {
	Target string
	// LastExport is when the last checkpoint reached the witness, and
	// LastSize its size; zero before the first.
	LastExport time.Time
	LastSize   uint64
	// LastError is the last export's error, "" when it succeeded; ErrorAt
	// is when it failed.
	LastError string
	ErrorAt   time.Time
	// Cosigned is the size of the latest checkpoint whose cosignature
	// verified with the witness's key, and CosignedAt the time in that
	// cosignature; zero before the first (and without a key).
	Cosigned   uint64
	CosignedAt time.Time
}

// NewExportWitness returns a witness exporting to target, a file path or an
// http(s) URL, without a witness key. Call Run to export.
func NewExportWitness(target string, log *slog.Logger) *ExportWitness {
	w, err := NewExport(ExportConfig{Target: target, Log: log})
	if err != nil {
		// Only a bad Key fails, and there is none.
		panic(err)
	}
	return w
}

// NewExport returns an ExportWitness; it fails on a Key that is not a
// cosignature/v1 verifier key. A URL target needs SetProver before Run.
func NewExport(cfg ExportConfig) (*ExportWitness, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Key != "" {
		if _, _, _, err := ParseCosignatureKey(cfg.Key); err != nil {
			return nil, err
		}
	}
	return &ExportWitness{cfg: cfg, client: &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}, wake: make(chan struct{}, 1), failures: map[string]uint64{}}, nil
}

// SetProver gives the witness the log's consistency proofs; a tlog-witness
// needs one from the size it last cosigned.
func (w *ExportWitness) SetProver(p Prover) {
	w.mu.Lock()
	w.prover = p
	w.mu.Unlock()
}

// Attach gives the witness the journal's consistency proofs and offers it
// the journal's latest checkpoint, so that a restarted CA shows the witness
// where its log stands before the next issuance.
func (w *ExportWitness) Attach(ctx context.Context, s *Store) error {
	w.SetProver(s)
	latest, err := s.LatestCheckpoint(ctx)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil
	case err != nil:
		return err
	}
	w.mu.Lock()
	pending := w.pending != nil
	w.mu.Unlock()
	if !pending {
		w.Offer(latest.Note)
	}
	return nil
}

// Offer replaces the pending checkpoint; it never blocks.
func (w *ExportWitness) Offer(signed []byte) {
	w.mu.Lock()
	w.pending = signed
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Run exports pending checkpoints until ctx ends, then exports the last one.
func (w *ExportWitness) Run(ctx context.Context) error {
	for {
		select {
		case <-w.wake:
			w.exportPending(ctx)
		case <-ctx.Done():
			w.exportPending(context.WithoutCancel(ctx))
			return nil
		}
	}
}

// Flush exports the pending checkpoint now.
func (w *ExportWitness) Flush(ctx context.Context) error {
	w.mu.Lock()
	signed := w.pending
	w.pending = nil
	w.mu.Unlock()
	if signed == nil {
		return nil
	}
	err := w.export(ctx, signed)
	now := w.cfg.Now()
	w.mu.Lock()
	if err != nil {
		w.status.LastError, w.status.ErrorAt = err.Error(), now
		w.failures[failureReason(err)]++
	} else {
		w.status.LastError, w.status.ErrorAt, w.status.LastExport = "", time.Time{}, now
		if _, rest, ok := bytes.Cut(signed, []byte("\n")); ok {
			line, _, _ := bytes.Cut(rest, []byte("\n"))
			w.status.LastSize, _ = strconv.ParseUint(string(line), 10, 64)
		}
	}
	w.mu.Unlock()
	return err
}

// Status reports how the exports went.
func (w *ExportWitness) Status() WitnessStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := w.status
	st.Target = RedactTarget(w.cfg.Target)
	return st
}

// RedactTarget returns a witness target fit to show or log: a URL keeps
// only its scheme, host and path (no userinfo, query or fragment, where
// credentials live); a file path is returned as it is.
func RedactTarget(target string) string {
	if !IsURL(target) {
		return target
	}
	u, err := url.Parse(target)
	if err != nil {
		return "(a witness URL that does not parse)"
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
}

// IsURL reports whether a witness target is an http(s) URL rather than a
// file path. Schemes are case-insensitive, as URLs' are: HTTPS://host is a
// URL, and its credentials are redacted like any other's.
func IsURL(target string) bool {
	scheme, ok := urlScheme(target)
	return ok && (strings.EqualFold(scheme, "http") || strings.EqualFold(scheme, "https"))
}

// CheckTarget refuses a witness target that looks like a URL of another
// scheme, which would otherwise be taken for a file path (and shown
// unredacted). The error names the scheme only.
func CheckTarget(target string) error {
	if scheme, ok := urlScheme(target); ok && !IsURL(target) {
		return fmt.Errorf("witness: a %q URL is not supported: give an http or https URL, or a file path", scheme)
	}
	return nil
}

// urlScheme returns the scheme of target when it starts with one
// (RFC 3986: a letter, then letters, digits, "+", "-" or ".") and "://".
func urlScheme(target string) (string, bool) {
	scheme, _, ok := strings.Cut(target, "://")
	if !ok || scheme == "" {
		return "", false
	}
	for i, r := range scheme {
		letter := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
		if !letter && (i == 0 || !(r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.')) {
			return "", false
		}
	}
	return scheme, true
}

func (w *ExportWitness) exportPending(ctx context.Context) {
	if err := w.Flush(ctx); err != nil {
		w.cfg.Log.Error("could not export the journal checkpoint to the witness", "target", RedactTarget(w.cfg.Target), "reason", failureReason(err), "error", err)
	}
}

func (w *ExportWitness) export(ctx context.Context, signed []byte) error {
	if IsURL(w.cfg.Target) {
		return w.addCheckpoint(ctx, signed)
	}
	if err := atomicfile.WriteFile(w.cfg.Target, signed, 0o600); err != nil {
		return fmt.Errorf("journal: witness: %w", err)
	}
	return nil
}
