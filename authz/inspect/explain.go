package inspect

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
)

// ExplainConfig is what `trustmesh policy explain` adds to Config.
type ExplainConfig struct {
	Config
	// HeaderAllowlist names the headers whose values an explanation may
	// show, as the decision log's; nil means
	// decisionlog.DefaultHeaderAllowlist. Other headers show only whether
	// the request has them.
	HeaderAllowlist []string
}

// Explain explains how the engine decides the CheckRequest in requestJSON
// (protojson, as Check reads it): the policies that applied and why, each
// rule's match or miss with its first failing field, and the decision,
// which is the one Check prints. Values from the request are redacted as
// the decision log redacts them: paths by the RedactPaths patterns, and
// header values unless allowlisted.
func Explain(ctx context.Context, cfg ExplainConfig, requestJSON []byte) (*engine.Explanation, error) {
	var req authv3.CheckRequest
	if err := protojson.Unmarshal(requestJSON, &req); err != nil {
		return nil, fmt.Errorf("%w: request: %w", ErrBadInput, err)
	}
	s, redact, err := cfg.build(ctx)
	if err != nil {
		return nil, err
	}
	ex, err := s.Explain(ctx, &req)
	if err != nil {
		return nil, fmt.Errorf("inspect: %w", err)
	}
	allow := cfg.HeaderAllowlist
	if allow == nil {
		allow = decisionlog.DefaultHeaderAllowlist
	}
	redactExplanation(ex, redact, allow)
	return ex, nil
}

// redactExplanation redacts, in place, what ex quotes of the request.
func redactExplanation(ex *engine.Explanation, r *decisionlog.PathRedactor, headerAllowlist []string) {
	allowed := map[string]bool{}
	for _, h := range headerAllowlist {
		allowed[strings.ToLower(h)] = true
	}
	ex.Request.Path, ex.Request.SentPath = r.Redact(ex.Request.Path), r.Redact(ex.Request.SentPath)
	ex.Decision = redactDecision(r, ex.Decision)
	for i := range ex.Policies {
		for j := range ex.Policies[i].Rules {
			ms := ex.Policies[i].Rules[j].Misses
			for k := range ms {
				m := &ms[k]
				switch {
				case m.Value == nil:
				case m.Header != "" && !allowed[m.Header]:
					v := decisionlog.Redacted
					m.Value = &v
				case m.Attribute == "request.path":
					v := r.Redact(*m.Value)
					m.Value = &v
				}
			}
		}
	}
}

// WriteExplanation writes ex as text, one policy after another in the
// order they are evaluated, and the decision last.
func WriteExplanation(w io.Writer, ex *engine.Explanation) error {
	p := &printer{w: w}
	d := ex.Destination
	p.printf("Destination: %s", d.Principal)
	if d.Namespace != "" {
		p.printf(" (namespace %s, labels %s)", d.Namespace, labels(d.Labels))
	}
	p.printf("\n")
	if rq := ex.Request; rq.Protocol != "" {
		p.printf("Request:     %s", rq.Protocol)
		if rq.Protocol == "http" {
			p.printf(" %s %s %s", rq.Method, rq.Host, rq.Path)
			if rq.SentPath != "" {
				p.printf(" (normalized from %s)", rq.SentPath)
			}
		}
		src := rq.Principal
		if src == "" {
			src = "a peer without mTLS"
		}
		p.printf(" from %s", src)
		if rq.SourceIP != "" {
			p.printf(" at %s", rq.SourceIP)
		}
		if rq.RemoteIP != "" && rq.RemoteIP != rq.SourceIP {
			p.printf(" (remote.ip %s)", rq.RemoteIP)
		}
		if rq.DestinationPort != 0 {
			p.printf(" to port %d", rq.DestinationPort)
		}
		p.printf("\n")
	}
	if sel := ex.Selection; len(sel.Namespaces) > 0 {
		p.printf("Selection:   the policies of the root namespace %s", sel.RootNamespace)
		if len(sel.Namespaces) > 1 {
			p.printf(" and of namespace %s", sel.Namespaces[1])
		}
		p.printf(" whose selector matches the destination's labels")
		if ex.Evaluated || ex.Decision.Reason == engine.ReasonNoPolicy {
			p.printf(": %d applied", ex.Decision.Applied)
		}
		p.printf("\n")
		for _, n := range sel.NotSelected {
			p.printf("  not applied: %s: %s\n", n.Policy, n.Why)
		}
	}
	if ex.Note != "" {
		p.printf("Note:        %s\n", ex.Note)
	}
	for _, pt := range ex.Policies {
		p.printf("\n%s %s", pt.Action, pt.Policy)
		if pt.Provider != "" {
			p.printf(" (provider %s)", pt.Provider)
		}
		if pt.DryRun {
			p.printf(" [dry-run: never enforced]")
		}
		if pt.Action == "AUDIT" {
			p.printf(" [audit: never decides]")
		}
		switch {
		case pt.Matched:
			p.printf(": matched rule %d", *pt.Rule)
		case len(pt.Rules) == 0:
			p.printf(": no rules, matches nothing")
		default:
			p.printf(": no rule matched")
		}
		if pt.ProviderAllowed != nil {
			p.printf(", the provider %s", map[bool]string{true: "allowed", false: "denied"}[*pt.ProviderAllowed])
		} else if pt.Action == "CUSTOM" && pt.Matched {
			p.printf(", no answer from the provider (not asked after another denied, or it failed: see the decision)")
		}
		if pt.Decides {
			p.printf("  <- decides")
		}
		if pt.ShadowDecides {
			p.printf("  <- decides the dry-run decision")
		}
		p.printf("\n")
		for _, rt := range pt.Rules {
			switch {
			case rt.SkippedForTCP:
				p.printf("  %s: skipped: an ALLOW rule with HTTP-only fields allows nothing over TCP\n", rt.Field)
				continue
			case rt.Matched:
				p.printf("  %s: match\n", rt.Field)
			default:
				p.printf("  %s: miss\n", rt.Field)
			}
			if len(rt.DroppedForTCP) > 0 {
				p.printf("    dropped for TCP, being HTTP-only (so the rule matches more): %s\n", strings.Join(rt.DroppedForTCP, ", "))
			}
			for _, m := range rt.Misses {
				p.printf("    %s: %s\n", m.Field, missText(m))
			}
		}
	}
	dec := ex.Decision
	p.printf("\nDecision:    %s: %s", verdict(dec.Allowed, dec.HTTPStatus), dec.Reason)
	if dec.Policy != "" {
		p.printf(" (%s %s rule %d)", dec.Action, dec.Policy, *dec.Rule)
	}
	if dec.Error != "" {
		p.printf(": %s", dec.Error)
	}
	p.printf("\n")
	if dr := dec.DryRun; dr != nil {
		p.printf("Dry run:     %s: %s", verdict(dr.Allowed, 0), dr.Reason)
		if dr.Policy != "" {
			p.printf(" (%s rule %d)", dr.Policy, *dr.Rule)
		}
		p.printf("\n")
	}
	for _, a := range dec.Audit {
		p.printf("Audit:       %s rule %d\n", a.Policy, a.Rule)
	}
	return p.err
}

func missText(m engine.FieldMiss) string {
	var b strings.Builder
	b.WriteString(m.Attribute)
	if m.Value == nil {
		b.WriteString(" is absent")
	} else {
		b.WriteString(" is " + strconv.Quote(*m.Value))
	}
	if m.Not {
		b.WriteString(", wanted none of ")
	} else {
		b.WriteString(", wanted ")
		if len(m.Wanted) > 1 {
			b.WriteString("one of ")
		}
	}
	q := make([]string, len(m.Wanted))
	for i, v := range m.Wanted {
		q[i] = strconv.Quote(v)
	}
	b.WriteString(strings.Join(q, ", "))
	if m.Note != "" {
		b.WriteString(" (" + m.Note + ")")
	}
	return b.String()
}

func verdict(allowed bool, status int) string {
	if allowed {
		return "allowed"
	}
	if status != 0 {
		return fmt.Sprintf("denied (%d)", status)
	}
	return "denied"
}

func labels(m map[string]string) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		keys[i] = k + "=" + m[k]
	}
	return strings.Join(keys, ",")
}

type printer struct {
	w   io.Writer
	err error
}

func (p *printer) printf(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, args...)
	}
}
