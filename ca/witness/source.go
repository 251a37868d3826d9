package witness

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// Source is where the witness reads a log: its latest signed checkpoint,
// and consistency proofs between two of its sizes.
type Source interface {
	// Name is the source as the operator gave it, fit to show.
	Name() string
	// Checkpoint returns the latest signed checkpoint note.
	Checkpoint(ctx context.Context) ([]byte, error)
	// Consistency returns the proof that the tree of size2 extends the
	// tree of size1.
	Consistency(ctx context.Context, size1, size2 uint64) ([][]byte, error)
}

// The paths a log serves its checkpoints and proofs at, under its base URL
// (trustmesh serve: http://MONITORING/journal).
const (
	CheckpointPath  = "/checkpoint"
	ConsistencyPath = "/consistency"
)

// maxResponse bounds what a source may send.
const maxResponse = 1 << 20

// HTTPSource reads a log over HTTP from base, which serves CheckpointPath
// and ConsistencyPath (see SourceHandler).
type HTTPSource struct {
	base   string
	client *http.Client
}

// NewHTTPSource returns a source reading base, an http(s) URL.
func NewHTTPSource(base string) (*HTTPSource, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("witness: source %s is not an http(s) URL", journal.RedactTarget(base))
	}
	return &HTTPSource{base: strings.TrimSuffix(base, "/"), client: &http.Client{Timeout: 30 * time.Second}}, nil
}

// Name is the URL without credentials.
func (s *HTTPSource) Name() string { return journal.RedactTarget(s.base) }

// Checkpoint fetches the latest checkpoint.
func (s *HTTPSource) Checkpoint(ctx context.Context) ([]byte, error) {
	return s.get(ctx, s.base+CheckpointPath)
}

// Consistency fetches a consistency proof.
func (s *HTTPSource) Consistency(ctx context.Context, size1, size2 uint64) ([][]byte, error) {
	b, err := s.get(ctx, fmt.Sprintf("%s%s?old=%d&new=%d", s.base, ConsistencyPath, size1, size2))
	if err != nil {
		return nil, err
	}
	return parseProofLines(bufio.NewScanner(bytes.NewReader(b)), false)
}

func (s *HTTPSource) get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: the URL does not parse", s.Name())
	}
	resp, err := s.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = journal.RedactTarget(ue.URL)
		}
		return nil, fmt.Errorf("witness: source %s: %w", s.Name(), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: %w", s.Name(), err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("witness: source %s answered %s: %s", s.Name(), resp.Status, strings.TrimSpace(string(b)))
	}
	return b, nil
}

// parseProofLines reads base64 SHA-256 hashes, one a line; with
// untilBlank it stops at an empty line (tlog-witness's request body).
func parseProofLines(sc *bufio.Scanner, untilBlank bool) ([][]byte, error) {
	hashes := [][]byte{}
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if untilBlank {
				return hashes, nil
			}
			continue
		}
		h, err := base64.StdEncoding.DecodeString(line)
		if err != nil || len(h) != 32 {
			return nil, fmt.Errorf("%w: proof line %q is not a base64 SHA-256 hash", ErrMalformed, line)
		}
		if len(hashes) == 63 {
			return nil, fmt.Errorf("%w: more than 63 proof hashes", ErrMalformed)
		}
		hashes = append(hashes, h)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if untilBlank {
		return nil, fmt.Errorf("%w: the proof is not followed by an empty line", ErrMalformed)
	}
	return hashes, nil
}

// StoreSource reads a journal directly: a data directory (SQLite) or the
// shared PostgreSQL journal. open is called for each read and the store
// closed after it, so that the source sees what the CA appended since.
type StoreSource struct {
	name string
	open func(ctx context.Context) (*journal.Store, error)
}

// NewStoreSource returns a source named name that opens its journal with
// open.
func NewStoreSource(name string, open func(ctx context.Context) (*journal.Store, error)) *StoreSource {
	return &StoreSource{name: name, open: open}
}

// Name is the name it was given.
func (s *StoreSource) Name() string { return s.name }

// Checkpoint returns the journal's latest stored checkpoint.
func (s *StoreSource) Checkpoint(ctx context.Context) ([]byte, error) {
	st, err := s.open(ctx)
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: %w", s.name, err)
	}
	defer st.Close()
	c, err := st.LatestCheckpoint(ctx)
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: %w", s.name, err)
	}
	return c.Note, nil
}

// Consistency proves consistency from the journal's stored entries.
func (s *StoreSource) Consistency(ctx context.Context, size1, size2 uint64) ([][]byte, error) {
	st, err := s.open(ctx)
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: %w", s.name, err)
	}
	defer st.Close()
	p, err := st.ConsistencyBetween(ctx, size1, size2)
	if err != nil {
		return nil, fmt.Errorf("witness: source %s: %w", s.name, err)
	}
	return p, nil
}

// SourceHandler serves a journal's latest checkpoint at CheckpointPath and
// consistency proofs at ConsistencyPath?old=N&new=M (one base64 hash a
// line), for monitors and witnesses: everything in them is public, and
// signed or checked against what is.
func SourceHandler(st *journal.Store) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+CheckpointPath, func(w http.ResponseWriter, r *http.Request) {
		c, err := st.LatestCheckpoint(r.Context())
		if errors.Is(err, journal.ErrNotFound) {
			http.Error(w, "the journal has no checkpoint yet", http.StatusNotFound)
			return
		}
		if err != nil {
			http.Error(w, "the journal is unavailable", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write(c.Note)
	})
	mux.HandleFunc("GET "+ConsistencyPath, func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		size1, err1 := strconv.ParseUint(q.Get("old"), 10, 64)
		size2, err2 := strconv.ParseUint(q.Get("new"), 10, 64)
		if err1 != nil || err2 != nil || size1 > size2 {
			http.Error(w, "give old and new sizes, old <= new", http.StatusBadRequest)
			return
		}
		p, err := st.ConsistencyBetween(r.Context(), size1, size2)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		var b bytes.Buffer
		for _, h := range p {
			b.WriteString(base64.StdEncoding.EncodeToString(h))
			b.WriteByte('\n')
		}
		_, _ = w.Write(b.Bytes())
	})
	return mux
}

func base64Std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
