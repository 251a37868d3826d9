// Package inspect answers questions about a policy set without serving it:
// what the engine decides for one CheckRequest or a batch of them
// (`trustmesh policy check`) and which Rego the policies compile to
// (`trustmesh policy compile`). It loads policies exactly as the server
// does and decides with the same engine code, so its answers agree with
// the server.
package inspect

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
)

// ErrBadInput marks errors in the caller's input (policies, bundles or the
// request); the command exits 2 for them.
var ErrBadInput = errors.New("inspect: bad input")

// Config names the policy set.
type Config struct {
	PolicyDir     string
	Bundles       []source.BundleConfig
	RootNamespace string
	// RedactPaths are the decision log's path patterns
	// (decisionlog.PathRedactor); what they match is replaced in the text
	// of decisions that may quote a path (error, body, headers).
	RedactPaths []string
}

func (c Config) build(ctx context.Context) (*engine.Set, *decisionlog.PathRedactor, error) {
	if c.PolicyDir == "" && len(c.Bundles) == 0 {
		return nil, nil, fmt.Errorf("%w: no policy directory or bundle given", ErrBadInput)
	}
	redact, err := decisionlog.NewPathRedactor(c.RedactPaths)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	var ps source.PolicySource
	if c.PolicyDir != "" {
		ps = &source.Dir{Path: c.PolicyDir, DefaultNamespace: "default"}
	}
	l, err := source.New(source.Config{Engine: engine.New(), Policies: ps, Bundles: c.Bundles, RootNamespace: c.RootNamespace})
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	s, err := l.Build(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	return s, redact, nil
}

// Check decides the CheckRequest in requestJSON (protojson) and writes the
// decision as one JSON object. An evaluation error is a decision (it
// denies), not an error.
func Check(ctx context.Context, cfg Config, requestJSON []byte, w io.Writer) error {
	var req authv3.CheckRequest
	if err := protojson.Unmarshal(requestJSON, &req); err != nil {
		return fmt.Errorf("%w: request: %w", ErrBadInput, err)
	}
	s, redact, err := cfg.build(ctx)
	if err != nil {
		return err
	}
	d, _ := s.Check(ctx, &req) // the decision carries the error
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(redactDecision(redact, d)); err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	return nil
}

// CheckBatch decides every CheckRequest (protojson) in r, given as JSON
// lines or as one JSON array, against one load of the policy set, and
// writes one decision per line (compact JSON) in the order of the
// requests. Every request is read before any is decided, so bad input
// writes nothing.
func CheckBatch(ctx context.Context, cfg Config, r io.Reader, w io.Writer) error {
	raws, err := readRequests(r)
	if err != nil {
		return err
	}
	reqs := make([]*authv3.CheckRequest, len(raws))
	for i, raw := range raws {
		reqs[i] = &authv3.CheckRequest{}
		if err := protojson.Unmarshal(raw, reqs[i]); err != nil {
			return fmt.Errorf("%w: request %d: %w", ErrBadInput, i+1, err)
		}
	}
	s, redact, err := cfg.build(ctx)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw) // Encode ends each decision with a newline
	for _, req := range reqs {
		d, _ := s.Check(ctx, req) // the decision carries the error
		if err := enc.Encode(redactDecision(redact, d)); err != nil {
			return fmt.Errorf("inspect: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	return nil
}

// readRequests reads a JSON array of objects, or objects separated by
// white space (JSON lines).
func readRequests(r io.Reader) ([]json.RawMessage, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("inspect: requests: %w", err)
	}
	b = bytes.TrimSpace(b)
	var out []json.RawMessage
	if len(b) > 0 && b[0] == '[' {
		if err := json.Unmarshal(b, &out); err != nil {
			return nil, fmt.Errorf("%w: requests: %w", ErrBadInput, err)
		}
	} else {
		dec := json.NewDecoder(bytes.NewReader(b))
		for {
			var raw json.RawMessage
			err := dec.Decode(&raw)
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("%w: request %d: %w", ErrBadInput, len(out)+1, err)
			}
			out = append(out, raw)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no requests", ErrBadInput)
	}
	for i, raw := range out {
		if raw = bytes.TrimSpace(raw); len(raw) == 0 || raw[0] != '{' {
			return nil, fmt.Errorf("%w: request %d is not a JSON object", ErrBadInput, i+1)
		}
	}
	return out, nil
}

// redactDecision returns d with what the path patterns match replaced in
// its free text: the error (which may quote the path) and what a denial
// sends back (body and headers), which a policy may build from the path.
func redactDecision(r *decisionlog.PathRedactor, d *engine.Decision) *engine.Decision {
	if r == nil || d == nil {
		return d
	}
	c := *d
	c.Error, c.Body = r.Redact(d.Error), r.Redact(d.Body)
	c.Headers, c.ResponseHeadersToAdd = redactHeaders(r, d.Headers), redactHeaders(r, d.ResponseHeadersToAdd)
	return &c
}

func redactHeaders(r *decisionlog.PathRedactor, hs []engine.Header) []engine.Header {
	if hs == nil {
		return nil
	}
	out := make([]engine.Header, len(hs))
	for i, h := range hs {
		out[i] = h
		out[i].Value = r.Redact(h.Value)
	}
	return out
}

// Compile writes the Rego the policies compile to, file by file.
func Compile(ctx context.Context, cfg Config, w io.Writer) error {
	s, _, err := cfg.build(ctx)
	if err != nil {
		return err
	}
	mods := s.Modules()
	names := make([]string, 0, len(mods))
	for n := range mods {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := fmt.Fprintf(w, "# ---- %s ----\n%s\n", n, mods[n]); err != nil {
			return fmt.Errorf("inspect: %w", err)
		}
	}
	return nil
}
