package analyze

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
	"github.com/trustmesh/trustmesh/mesh"
)

// The rule analyzers read policies with authz/symbolic, which reports only
// what it proves (over exact, prefix and suffix strings, presence, CIDRs
// and ports): where it cannot tell, they report nothing.

func rulePath(i int) string { return fmt.Sprintf("spec.rules[%d]", i) }

var deadDenyAnalyzer = Analyzer{
	Code: "TMA010",
	Name: "dead-deny-rules",
	Description: "A DENY rule whose fields exclude each other (a value and its negation, two values of one attribute that " +
		"cannot both hold) matches no request, HTTP or TCP, so it denies nothing.",
	Run: func(in *Input) ([]Finding, string) {
		var out []Finding
		for _, p := range in.Policies {
			if p.Action != policy.Deny {
				continue
			}
			for i, r := range p.Rules {
				if !symbolic.NeverMatches(policy.Deny, r) {
					continue
				}
				out = append(out, Finding{
					Code: "TMA010", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin, Field: rulePath(i),
					Message: fmt.Sprintf("this DENY rule can never match, so it denies nothing: %s. Fix the values so that the "+
						"request you mean to deny satisfies every field, or delete the rule", conflicts(r)),
				})
			}
		}
		return out, ""
	},
}

// conflicts says which fields of a rule of a DENY policy exclude each
// other, for each source × operation combination that does.
func conflicts(r policy.Rule) string {
	seen := map[string]bool{}
	var out []string
	for _, c := range symbolic.Compile(policy.Deny, r, symbolic.HTTP).Conjs {
		lits := c.Conflict()
		if len(lits) == 0 {
			continue
		}
		var fields []string
		for _, l := range lits {
			if l.Field != "" && !slices.Contains(fields, l.Field) {
				fields = append(fields, l.Field)
			}
		}
		attr := lits[0].Key.Attr.String()
		if lits[0].Key.Attr == policy.Header {
			attr = "request.headers[" + lits[0].Key.Header + "]"
		}
		s := attr + ": " + strings.Join(fields, " and ") + " exclude each other"
		if len(fields) == 1 {
			s = attr + ": " + fields[0] + " matches nothing"
		}
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return "its fields exclude each other"
	}
	if len(out) > 3 {
		out = append(out[:3], fmt.Sprintf("and %d more", len(out)-3))
	}
	return strings.Join(out, "; ")
}

var shadowedAllowAnalyzer = Analyzer{
	Code: "TMA011",
	Name: "shadowed-allow-rules",
	Description: "An ALLOW rule that an enforced DENY rule, applying to every workload the ALLOW applies to, matches for " +
		"every request the ALLOW rule matches: the DENY decides, and the ALLOW rule allows nothing.",
	Run: func(in *Input) ([]Finding, string) {
		var denies []*policy.Policy
		for _, p := range in.Policies {
			if p.Action == policy.Deny && !p.DryRun {
				denies = append(denies, p)
			}
		}
		sort.SliceStable(denies, func(i, j int) bool { return denies[i].Key() < denies[j].Key() })
		var out []Finding
		for _, p := range in.Policies {
			if p.Action != policy.Allow {
				continue
			}
			for ai, r := range p.Rules {
				if symbolic.NeverMatches(policy.Allow, r) {
					continue // it allows nothing anyway: no DENY decides
				}
				ds := symbolic.Deciding(denies, p, ai, in.RootNamespace)
				if len(ds) == 0 {
					continue
				}
				var names []string
				for _, d := range ds {
					names = append(names, d.Policy.Key()+" "+rulePath(d.Rule))
				}
				by := "DENY policy " + names[0] + ", which applies"
				if len(ds) > 1 {
					by = "one of the DENY rules " + strings.Join(names, ", ") + " (each request by one of them), which apply"
				}
				out = append(out, Finding{
					Code: "TMA011", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin, Field: rulePath(ai),
					Message: fmt.Sprintf("every request this ALLOW rule matches is also matched by %s "+
						"to every workload this policy selects: the DENY decides, so this rule allows nothing. Narrow the DENY "+
						"if these requests should be allowed, or delete this rule", by),
				})
			}
		}
		return out, ""
	},
}

var emptyAllowAnalyzer = Analyzer{
	Code: "TMA012",
	Name: "empty-allow",
	Description: "An ALLOW policy with rules: [] matches no request. The workloads it selects are denied every request unless " +
		"another ALLOW policy applies to them, in which case it changes nothing. The author probably meant rules: [{}].",
	Run: func(in *Input) ([]Finding, string) {
		var out []Finding
		for _, p := range in.Policies {
			if p.Action != policy.Allow || len(p.Rules) > 0 {
				continue
			}
			msg := "this ALLOW policy has rules: [], which matches no request. "
			if in.Mesh == nil {
				msg += "For each workload it selects: if another ALLOW policy applies to it, this policy changes nothing; if " +
					"none does, this policy denies it every request (give --mesh or --kubeconfig to learn which holds). "
			} else {
				msg += emptyAllowEffect(in, p) + " "
			}
			if p.DryRun {
				msg += "It is dry-run, so this shows only in the dry-run decision. "
			}
			msg += "To allow every request, write rules: [{}]; to deny every request, say so with a DENY policy"
			out = append(out, Finding{Code: "TMA012", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
				Field: "spec.rules", Message: msg})
		}
		return out, ""
	},
}

// emptyAllowEffect says, from the mesh, which workloads an empty ALLOW
// policy denies everything and which another ALLOW policy still serves.
func emptyAllowEffect(in *Input, p *policy.Policy) string {
	var served, denied []string
	var other string
	for _, w := range selected(in, p) {
		found := ""
		for _, q := range policy.Applicable(in.Policies, in.RootNamespace, w.Namespace, w.Labels) {
			if q != p && q.Action == policy.Allow && !q.DryRun && len(q.Rules) > 0 {
				found = q.Key()
				break
			}
		}
		if found == "" {
			denied = append(denied, w.Key())
			continue
		}
		served = append(served, w.Key())
		if other == "" {
			other = found
		}
	}
	switch {
	case len(served) == 0 && len(denied) == 0:
		return "It selects no workload in the mesh yet; once one exists, it is denied every request unless another ALLOW policy applies to it."
	case len(denied) == 0:
		return fmt.Sprintf("Every workload it selects (%s) has another ALLOW policy (such as %s), so this policy changes nothing.", list(served), other)
	case len(served) == 0:
		return fmt.Sprintf("No other ALLOW policy applies to the workloads it selects (%s), so they are denied every request.", list(denied))
	}
	return fmt.Sprintf("Of the workloads it selects, %s have no other ALLOW policy and are denied every request; %s have one (such as %s), for which this policy changes nothing.",
		list(denied), list(served), other)
}

// selected returns the workloads of the mesh that a policy applies to.
func selected(in *Input, p *policy.Policy) []*mesh.Workload {
	var out []*mesh.Workload
	for _, w := range in.Mesh.AllWorkloads() {
		if (p.Namespace == in.RootNamespace || w.Namespace == p.Namespace) && p.Selects(w.Labels) {
			out = append(out, w)
		}
	}
	return out
}

// list names up to three items and how many more there are.
func list(xs []string) string {
	if len(xs) > 3 {
		return strings.Join(xs[:3], ", ") + fmt.Sprintf(" and %d more", len(xs)-3)
	}
	return strings.Join(xs, ", ")
}

var denyAllAnalyzer = Analyzer{
	Code: "TMA013",
	Name: "deny-all",
	Description: "A DENY policy with an empty rule (rules: [{}]) matches, and denies, every request to the workloads it " +
		"selects.",
	Run: func(in *Input) ([]Finding, string) {
		var out []Finding
		for _, p := range in.Policies {
			if p.Action != policy.Deny {
				continue
			}
			for i, r := range p.Rules {
				if len(r.From) > 0 || len(r.To) > 0 || len(r.When) > 0 {
					continue
				}
				scope := "every workload in namespace " + p.Namespace
				switch {
				case p.Namespace == in.RootNamespace && len(p.Selector) == 0:
					scope = "every workload in the mesh (" + p.Namespace + " is the root namespace)"
				case p.Namespace == in.RootNamespace:
					scope = "every workload in the mesh labelled " + labels(p)
				case len(p.Selector) > 0:
					scope = "every workload in namespace " + p.Namespace + " labelled " + labels(p)
				}
				msg := fmt.Sprintf("this rule is empty, so it matches every request: this DENY policy denies every request to %s. "+
					"If that is meant, keep it; otherwise give the rule the from, to or when fields of the requests to deny "+
					"(rules: [] in a DENY matches nothing)", scope)
				if p.DryRun {
					msg += "; it is dry-run, so it shows only in the dry-run decision for now"
				}
				out = append(out, Finding{Code: "TMA013", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field: rulePath(i), Message: msg})
			}
		}
		return out, ""
	},
}

var httpOnTCPAnalyzer = Analyzer{
	Code: "TMA014",
	Name: "http-fields-on-tcp",
	Description: "A rule with HTTP-only fields (hosts, methods, paths, request.headers) in a policy that selects workloads " +
		"serving TCP-only ports: on those ports the fields are dropped, which broadens a DENY (it matches all TCP traffic " +
		"that matches the rest of the rule) and narrows an ALLOW (the rule allows no TCP traffic).",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		var out []Finding
		for _, p := range in.Policies {
			var ports []tcpPort
			for i, r := range p.Rules {
				fields := httpFields(r)
				if len(fields) == 0 {
					continue
				}
				if ports == nil {
					ports = tcpPorts(in, p)
				}
				var hit []string
				for _, tp := range ports {
					if ruleMayMatchTCPPort(p.Action, r, tp.port) {
						hit = append(hit, tp.String())
					}
				}
				if len(hit) == 0 {
					continue
				}
				msg := fmt.Sprintf("this rule uses HTTP-only fields (%s), but the policy selects workloads that serve TCP-only ports (%s), "+
					"where those fields are dropped. ", strings.Join(fields, ", "), list(hit))
				switch p.Action {
				case policy.Allow:
					msg += "That narrows this ALLOW: the rule allows no TCP traffic on those ports. To allow it, add a rule " +
						"without HTTP-only fields (e.g. with ports); if the ports carry HTTP, declare their protocol as HTTP"
				case policy.Deny:
					msg += "That broadens this DENY: on those ports it denies all TCP traffic that matches the rest of the rule. " +
						"Restrict the rule to the HTTP ports with ports, or declare the ports' protocol as HTTP if they carry HTTP"
				default:
					msg += fmt.Sprintf("That broadens this %s policy: on those ports the rule matches all TCP traffic that matches "+
						"the rest of it. Restrict the rule to the HTTP ports with ports", p.Action)
				}
				out = append(out, Finding{Code: "TMA014", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field: rulePath(i), Message: msg})
			}
		}
		return out, ""
	},
}

// httpFields lists the HTTP-only fields of a rule.
func httpFields(r policy.Rule) []string {
	var out []string
	r.EachField(func(f policy.Field) {
		if f.Attr.HTTPOnly() && !slices.Contains(out, f.Name) {
			out = append(out, f.Name)
		}
	})
	return out
}

// tcpPort is a TCP-only port a workload selected by a policy serves.
type tcpPort struct {
	service  string
	port     uint32 // the port the workload listens on, which checks carry
	workload string
}

func (t tcpPort) String() string {
	return fmt.Sprintf("%d of service %s on %s", t.port, t.service, t.workload)
}

// tcpPorts returns, once per port number, the TCP-only service ports that
// workloads a policy selects serve. Ambient workloads are left out: every
// port of theirs is TCP to the node proxy, which TMA015 reports.
func tcpPorts(in *Input, p *policy.Policy) []tcpPort {
	sel := map[string]bool{}
	for _, w := range selected(in, p) {
		sel[w.Key()] = true
	}
	for _, w := range selected(in, p) {
		if w.Mode() == mesh.DataPlaneAmbient {
			delete(sel, w.Key())
		}
	}
	seen := map[uint32]bool{}
	out := []tcpPort{}
	for _, s := range in.Mesh.Services {
		for _, port := range s.Ports {
			if port.Protocol.IsHTTP() {
				continue
			}
			for _, e := range s.Endpoints {
				if e.Workload == nil || !sel[e.Workload.Key()] {
					continue
				}
				t := e.TargetPort(port)
				if seen[t] {
					continue
				}
				seen[t] = true
				out = append(out, tcpPort{service: s.Key(), port: t, workload: e.Workload.Key()})
			}
		}
	}
	return out
}

// ruleMayMatchTCPPort reports whether a rule is not proved to exclude
// destination port port: for an ALLOW (dropped on TCP), whether its HTTP
// form may; otherwise whether its TCP form may, which is then broadened.
func ruleMayMatchTCPPort(a policy.Action, r policy.Rule, port uint32) bool {
	proto := symbolic.TCP
	if a == policy.Allow {
		proto = symbolic.HTTP
	}
	c := symbolic.Compile(a, r, proto)
	if c.TooBig {
		return true
	}
	on := symbolic.Literal{Key: symbolic.Key{Attr: policy.DestinationPort}, Op: symbolic.In,
		Patterns: []symbolic.Pattern{{Kind: symbolic.Port, Port: int(port)}}}
	for _, conj := range c.Conjs {
		if append(conj[:len(conj):len(conj)], on).Satisfiable() {
			return true
		}
	}
	return false
}
