// Package access answers "who may call whom": for every caller of the mesh
// model (a service, or the workloads that serve none) and every port of
// every service, whether the AuthorizationPolicies allow every request,
// deny every request, or decide on the request itself (a path, a method, a
// header, an external authorizer). The UI's access view and `trustmesh
// policy who-can` both show this one computation.
//
// It reads the policies as the engine (authz/engine) evaluates them and
// proves each answer with authz/symbolic, the analysis `trustmesh analyze`
// uses: for one caller identity and one destination workload and port,
// the facts of the pair (the caller's SPIFFE ID and what follows from it,
// the destination's address and target port) are fixed, everything else
// of the request is unknown. A rule that is proved to match every such
// request, or none, decides; a rule that may match some is a condition,
// said in words. Istio's order holds: CUSTOM (an external authorizer,
// always a condition), then DENY, then ALLOW (no ALLOW policy that
// applies: allow); AUDIT and dry-run policies never decide. The policies
// that apply to a destination workload are chosen by policy.Applicable,
// as the engine chooses them.
//
// The answers are sound but may be cautious: "allowed" and "denied" are
// proofs; what cannot be proved either way is "conditional", with the
// rules that may decide. "allowed" speaks of the requests the engine
// evaluates: a request whose path normalization rejects is denied before
// any policy.
package access

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

// ErrInput marks an input Compute refuses.
var ErrInput = errors.New("access: bad input")

// Options configure Compute.
type Options struct {
	// RootNamespace holds the mesh-wide policies; empty means
	// engine.DefaultRootNamespace.
	RootNamespace string
	// TrustDomain, when set, is the trust domain the mesh is validated
	// against (mesh.Mesh.Validate); an invalid mesh is refused.
	TrustDomain string
	// PolicyVersion and MeshVersion name the snapshots the policies and
	// the mesh come from; the Matrix carries them.
	PolicyVersion uint64
	MeshVersion   uint64
	// Redact, when set, redacts the request values that conditions quote
	// as the decision log would: header values unless allowlisted, path
	// values through its path patterns. Nil quotes policies verbatim.
	Redact *decisionlog.Redactor
}

// Matrix is who may call whom.
type Matrix struct {
	PolicyVersion uint64 `json:"policy_version"`
	MeshVersion   uint64 `json:"mesh_version"`
	// Services are the callers and callees, sorted by ID.
	Services []Service `json:"services"`
	// Cells are one per caller, service and port, sorted by From, To and
	// Port.
	Cells []Cell `json:"cells"`
}

// The kinds of Service.
const (
	KindService  = "service"
	KindWorkload = "workload"
)

// Service is a caller or callee: a mesh service, or (kind "workload") the
// workloads of one SPIFFE ID that serve no service, which only call.
type Service struct {
	// ID is "namespace/name"; for a workload entry the name is the
	// service account, or "sa:" and the service account when a service
	// of the namespace has that name.
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Kind      string `json:"kind"`
	// Identities are the SPIFFE IDs of its workloads.
	Identities []string `json:"identities"`
	Ports      []Port   `json:"ports"`
}

// Port is a port of a service.
type Port struct {
	Port     uint32 `json:"port"`
	Name     string `json:"name"`
	Protocol string `json:"protocol"`
}

// Verdict is a cell's answer.
type Verdict string

// The verdicts.
const (
	// Allowed: every request from the caller to the port is allowed.
	Allowed Verdict = "allowed"
	// Denied: every request is denied.
	Denied Verdict = "denied"
	// Conditional: the request decides (Conditions say how), or an
	// external authorizer does, or the caller's identities or the
	// service's workloads are not all treated alike.
	Conditional Verdict = "conditional"
)

// Cell is the answer for one caller, service and port.
type Cell struct {
	From    string  `json:"from"`
	To      string  `json:"to"`
	Port    uint32  `json:"port"`
	Verdict Verdict `json:"verdict"`
	// Conditions say, in words, what a conditional cell depends on.
	Conditions []string `json:"conditions"`
	// Policy ("namespace/name") and Rule decide the cell, when one does;
	// for a conditional cell, the first CUSTOM or DENY rule that may
	// decide, else the first ALLOW rule that may match (for one caller
	// identity and workload whose answer is not an allow, when they
	// differ).
	Policy string `json:"policy"`
	Rule   *int   `json:"rule"`
	Reason string `json:"reason"`
}

// The reasons of cells.
const (
	ReasonAllowMatches   = "ALLOW rule matches"
	ReasonNoAllowPolicy  = "no ALLOW policy applies"
	ReasonDenyMatches    = "DENY rule matches"
	ReasonNoAllowMatches = "no ALLOW rule matches"
	ReasonDepends        = "depends on the request"
	ReasonCustom         = "an external authorizer (CUSTOM) decides"
	ReasonMixed          = "differs between the caller's identities or the service's workloads"
	ReasonPeerRejected   = "peer identity rejected"
	ReasonNoWorkloads    = "no workload serves the service"
)

// To returns the cells whose callee is service, on port (0: every port).
func (m *Matrix) To(service string, port uint32) []Cell {
	var out []Cell
	for _, c := range m.Cells {
		if c.To == service && (port == 0 || c.Port == port) {
			out = append(out, c)
		}
	}
	return out
}

// From returns the cells whose caller is service.
func (m *Matrix) From(service string) []Cell {
	var out []Cell
	for _, c := range m.Cells {
		if c.From == service {
			out = append(out, c)
		}
	}
	return out
}

// Service returns the service with that ID, or nil.
func (m *Matrix) Service(id string) *Service {
	for i := range m.Services {
		if m.Services[i].ID == id {
			return &m.Services[i]
		}
	}
	return nil
}

// caller is a Service with the identities its requests carry.
type caller struct {
	id  string
	ids []string // "spiffe://..."
}

// callee is a service with the workloads that serve it.
type callee struct {
	svc *mesh.Service
}

// Compute returns who may call whom under policies over the mesh m.
func Compute(policies []*policy.Policy, m *mesh.Mesh, o Options) (*Matrix, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no mesh", ErrInput)
	}
	if o.TrustDomain != "" {
		td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
		if err != nil {
			return nil, fmt.Errorf("%w: trust domain: %w", ErrInput, err)
		}
		if err := m.Validate(td); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInput, err)
		}
	}
	root := o.RootNamespace
	if root == "" {
		root = engine.DefaultRootNamespace
	}
	ps := slices.Clone(policies)
	for _, p := range ps {
		if p == nil {
			return nil, fmt.Errorf("%w: nil policy", ErrInput)
		}
	}
	// The engine's evaluation order (engine.Build sorts by key).
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Key() < ps[j].Key() })

	out := &Matrix{PolicyVersion: o.PolicyVersion, MeshVersion: o.MeshVersion, Services: []Service{}, Cells: []Cell{}}
	svcKeys := map[string]bool{}
	served := map[string]bool{} // workload keys behind a service
	var callers []caller
	var callees []*mesh.Service
	for _, s := range m.Services {
		svcKeys[s.Key()] = true
	}
	for _, s := range m.Services {
		sv := Service{ID: s.Key(), Namespace: s.Namespace, Name: s.Name, Kind: KindService, Identities: []string{}, Ports: []Port{}}
		for _, p := range s.Ports {
			sv.Ports = append(sv.Ports, Port{Port: p.Port, Name: p.Name, Protocol: string(p.Protocol)})
		}
		for _, e := range s.Endpoints {
			if e.Workload == nil {
				continue
			}
			served[e.Workload.Key()] = true
			if id := e.Workload.ID.String(); !slices.Contains(sv.Identities, id) {
				sv.Identities = append(sv.Identities, id)
			}
		}
		sort.Strings(sv.Identities)
		out.Services = append(out.Services, sv)
		if len(sv.Identities) > 0 {
			callers = append(callers, caller{id: sv.ID, ids: sv.Identities})
		}
		callees = append(callees, s)
	}
	// Workloads that serve no service, one entry per SPIFFE ID.
	byID := map[string]*Service{}
	var order []string
	for _, w := range m.AllWorkloads() {
		if served[w.Key()] {
			continue
		}
		id := w.ID.String()
		if byID[id] == nil {
			name := w.ServiceAccount
			if name == "" {
				name = w.Name
			}
			key := w.Namespace + "/" + name
			if svcKeys[key] {
				name = "sa:" + name
				key = w.Namespace + "/" + name
			}
			byID[id] = &Service{ID: key, Namespace: w.Namespace, Name: name, Kind: KindWorkload, Identities: []string{id}, Ports: []Port{}}
			order = append(order, id)
		}
	}
	for _, id := range order {
		sv := byID[id]
		out.Services = append(out.Services, *sv)
		callers = append(callers, caller{id: sv.ID, ids: sv.Identities})
	}
	sort.Slice(out.Services, func(i, j int) bool { return out.Services[i].ID < out.Services[j].ID })
	sort.Slice(callers, func(i, j int) bool { return callers[i].id < callers[j].id })
	sort.Slice(callees, func(i, j int) bool { return callees[i].Key() < callees[j].Key() })

	ev := newEvaluator(ps, root)
	ev.redact = o.Redact
	for _, c := range callers {
		for _, s := range callees {
			for _, p := range s.Ports {
				out.Cells = append(out.Cells, ev.cell(c, s, p))
			}
		}
	}
	return out, nil
}

// cell decides one caller, service and port over every identity of the
// caller and every workload of the service.
func (ev *evaluator) cell(c caller, s *mesh.Service, p mesh.Port) Cell {
	cell := Cell{From: c.id, To: s.Key(), Port: p.Port, Conditions: []string{}}
	proto := tcp
	if p.Protocol.IsHTTP() {
		proto = http
	}
	var outs []labelled
	multiID := len(c.ids) > 1
	var dests []mesh.Endpoint
	for _, e := range s.Endpoints {
		if e.Workload != nil {
			dests = append(dests, e)
		}
	}
	if len(dests) == 0 {
		cell.Verdict, cell.Reason = Denied, ReasonNoWorkloads
		return cell
	}
	multiDest := len(dests) > 1
	for _, id := range c.ids {
		for _, e := range dests {
			o := ev.cachedEval(id, e.Workload, e.Address, e.TargetPort(p), proto)
			var who []string
			if multiID {
				who = append(who, "from "+id)
			}
			if multiDest {
				who = append(who, "to "+e.Workload.Key())
			}
			outs = append(outs, labelled{who: strings.Join(who, " "), o: o})
		}
	}
	combine(&cell, outs)
	return cell
}

// labelled is one identity's outcome at one workload, with who it is.
type labelled struct {
	who string
	o   outcome
}

// combine folds the outcomes of every identity and workload into the
// cell: one verdict if all agree, else conditional, saying which way each
// goes.
func combine(cell *Cell, outs []labelled) {
	first := outs[0].o
	same := true
	sameConds := true
	for _, l := range outs[1:] {
		if l.o.verdict != first.verdict {
			same = false
		}
		if !slices.Equal(l.o.conds, first.conds) {
			sameConds = false
		}
	}
	cell.Policy, cell.Rule, cell.Reason = first.policy, first.rule, first.reason
	if same && (first.verdict != Conditional || sameConds) {
		cell.Verdict = first.verdict
		cell.Conditions = append(cell.Conditions, first.conds...)
		return
	}
	cell.Verdict = Conditional
	if !same {
		cell.Reason = ReasonMixed
	}
	for _, l := range outs {
		switch l.o.verdict {
		case Conditional:
			for _, c := range l.o.conds {
				cell.Conditions = appendNew(cell.Conditions, l.who+": "+c)
			}
		default:
			cell.Conditions = appendNew(cell.Conditions, l.who+": "+string(l.o.verdict)+" ("+l.o.describe()+")")
		}
	}
	// The policy of the first outcome that is not an allow names the
	// cell's, else the first that names one.
	cell.Policy, cell.Rule = "", nil
	for _, allow := range []bool{false, true} {
		for _, l := range outs {
			if (l.o.verdict == Allowed) == allow && l.o.policy != "" {
				cell.Policy, cell.Rule = l.o.policy, l.o.rule
				return
			}
		}
	}
}

func appendNew(xs []string, x string) []string {
	if slices.Contains(xs, x) {
		return xs
	}
	return append(xs, x)
}
