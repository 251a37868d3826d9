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
// directory: in a file (replaced atomically) or by HTTP POST to a URL. Once
// a checkpoint is out there, whoever owns the database cannot rewrite or cut
// the history it covers without `trustmesh audit verify --checkpoint`
// noticing. Exports happen off the commit path; only the newest pending
// checkpoint is kept, since it covers all earlier ones.
type ExportWitness struct {
	target string
	log    *slog.Logger
	client *http.Client

	mu      sync.Mutex
	pending []byte
	wake    chan struct{}
	status  WitnessStatus
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
}

// NewExportWitness returns a witness exporting to target, a file path or an
// http(s) URL. Call Run to export.
func NewExportWitness(target string, log *slog.Logger) *ExportWitness {
	if log == nil {
		log = slog.Default()
	}
	return &ExportWitness{target: target, log: log, client: &http.Client{Timeout: 10 * time.Second}, wake: make(chan struct{}, 1)}
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
	w.mu.Lock()
	if err != nil {
		w.status.LastError, w.status.ErrorAt = err.Error(), time.Now()
	} else {
		w.status.LastError, w.status.ErrorAt, w.status.LastExport = "", time.Time{}, time.Now()
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
	st.Target = RedactTarget(w.target)
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
		w.log.Error("could not export the journal checkpoint to the witness", "target", RedactTarget(w.target), "error", err)
	}
}

func (w *ExportWitness) export(ctx context.Context, signed []byte) error {
	if IsURL(w.target) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.target, bytes.NewReader(signed))
		if err != nil {
			// url.Parse's error quotes the URL it refused.
			return fmt.Errorf("journal: witness %s: the URL does not parse", RedactTarget(w.target))
		}
		req.Header.Set("Content-Type", "text/plain; charset=utf-8")
		resp, err := w.client.Do(req)
		if err != nil {
			// The client's *url.Error quotes the URL with its query (and
			// masks only a password): name the redacted target instead.
			var ue *url.Error
			if errors.As(err, &ue) {
				ue.URL = RedactTarget(w.target)
			}
			return fmt.Errorf("journal: witness: %w", err)
		}
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("journal: witness %s answered %s", RedactTarget(w.target), resp.Status)
		}
		return nil
	}
	if err := atomicfile.WriteFile(w.target, signed, 0o600); err != nil {
		return fmt.Errorf("journal: witness: %w", err)
	}
	return nil
}
