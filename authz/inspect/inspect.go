// Package inspect answers questions about a policy set without serving it:
// what the engine decides for one CheckRequest (`trustmesh policy check`)
// and which Rego the policies compile to (`trustmesh policy compile`). It
// loads policies exactly as the server does and decides with the same
// engine code, so its answers agree with the server.
package inspect

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protojson"

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
}

func (c Config) build(ctx context.Context) (*engine.Set, error) {
	if c.PolicyDir == "" && len(c.Bundles) == 0 {
		return nil, fmt.Errorf("%w: no policy directory or bundle given", ErrBadInput)
	}
	var ps source.PolicySource
	if c.PolicyDir != "" {
		ps = &source.Dir{Path: c.PolicyDir, DefaultNamespace: "default"}
	}
	l, err := source.New(source.Config{Engine: engine.New(), Policies: ps, Bundles: c.Bundles, RootNamespace: c.RootNamespace})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	s, err := l.Build(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadInput, err)
	}
	return s, nil
}

// Check decides the CheckRequest in requestJSON (protojson) and writes the
// decision as one JSON object. An evaluation error is a decision (it
// denies), not an error.
func Check(ctx context.Context, cfg Config, requestJSON []byte, w io.Writer) error {
	var req authv3.CheckRequest
	if err := protojson.Unmarshal(requestJSON, &req); err != nil {
		return fmt.Errorf("%w: request: %w", ErrBadInput, err)
	}
	s, err := cfg.build(ctx)
	if err != nil {
		return err
	}
	d, _ := s.Check(ctx, &req) // the decision carries the error
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(d); err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	return nil
}

// Compile writes the Rego the policies compile to, file by file.
func Compile(ctx context.Context, cfg Config, w io.Writer) error {
	s, err := cfg.build(ctx)
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
