package decisionlog

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// ErrBadPattern marks a path redaction pattern that does not compile or
// that matches the empty string (it would redact between every byte).
var ErrBadPattern = errors.New("decisionlog: bad path redaction pattern")

// PathRedactor replaces the parts of request paths that operator patterns
// match: a pattern with capturing groups has its groups replaced by
// Redacted, and a pattern without groups its whole match. So
// `^/users/([^/]+)` turns /users/alice/orders into /users/REDACTED/orders.
// Patterns apply in turn, each to every match. A nil *PathRedactor keeps
// everything.
//
// Everything that shows a request's path after the fact (the decision log,
// `trustmesh policy check`) passes the path, and free text that may quote
// it (an evaluation error, a denial body), through the same PathRedactor.
type PathRedactor struct {
	patterns []*regexp.Regexp
}

// NewPathRedactor compiles patterns (RE2 syntax), reporting every bad one.
// No patterns gives nil, which redacts nothing.
func NewPathRedactor(patterns []string) (*PathRedactor, error) {
	if len(patterns) == 0 {
		return nil, nil
	}
	r := &PathRedactor{}
	var errs []error
	for _, p := range patterns {
		re, err := regexp.Compile(p)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%w %q: %w", ErrBadPattern, p, err))
		case re.MatchString(""):
			errs = append(errs, fmt.Errorf("%w %q: it matches the empty string", ErrBadPattern, p))
		default:
			r.patterns = append(r.patterns, re)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return r, nil
}

// Redact returns s with what the patterns match replaced by Redacted.
func (r *PathRedactor) Redact(s string) string {
	if r == nil || s == "" {
		return s
	}
	for _, re := range r.patterns {
		s = redactAll(re, s)
	}
	return s
}

func redactAll(re *regexp.Regexp, s string) string {
	matches := re.FindAllStringSubmatchIndex(s, -1)
	if matches == nil {
		return s
	}
	var b strings.Builder
	last := 0 // s[:last] is written
	for _, m := range matches {
		spans := m[:2] // the whole match
		if re.NumSubexp() > 0 {
			spans = m[2:]
		}
		for i := 0; i+1 < len(spans); i += 2 {
			start, end := spans[i], spans[i+1]
			if start < last || start == end {
				continue // a group that did not take part, is empty, or is nested in one already replaced
			}
			b.WriteString(s[last:start])
			b.WriteString(Redacted)
			last = end
		}
	}
	b.WriteString(s[last:])
	return b.String()
}
