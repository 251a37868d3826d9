package access

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// Answer is the part of a Matrix that `trustmesh policy who-can` shows:
// the cells into one service (and port), or out of one caller.
type Answer struct {
	PolicyVersion uint64 `json:"policy_version"`
	MeshVersion   uint64 `json:"mesh_version"`
	// To and Port, or From, are the question.
	To    string `json:"to,omitempty"`
	Port  uint32 `json:"port,omitempty"`
	From  string `json:"from,omitempty"`
	Cells []Cell `json:"cells"`
}

// WhoCan answers --to SERVICE[:PORT] (to) or --from SERVICE (from); one
// of them is empty. PORT is a port number or name of the service. An
// unknown service or port is refused with ErrInput, naming what there is.
func (m *Matrix) WhoCan(to, from string) (*Answer, error) {
	if (to == "") == (from == "") {
		return nil, fmt.Errorf("%w: give one of --to SERVICE[:PORT] and --from SERVICE", ErrInput)
	}
	a := &Answer{PolicyVersion: m.PolicyVersion, MeshVersion: m.MeshVersion}
	if from != "" {
		if m.Service(from) == nil {
			return nil, fmt.Errorf("%w: --from %q: %s", ErrInput, from, m.known(""))
		}
		a.From, a.Cells = from, m.From(from)
	} else {
		name, portText, hasPort := strings.Cut(to, ":")
		s := m.Service(name)
		if s == nil || s.Kind != KindService {
			return nil, fmt.Errorf("%w: --to %q: %s", ErrInput, name, m.known(KindService))
		}
		var port uint32
		if hasPort {
			for _, p := range s.Ports {
				if p.Name == portText || strconv.FormatUint(uint64(p.Port), 10) == portText {
					port = p.Port
				}
			}
			if port == 0 {
				var ps []string
				for _, p := range s.Ports {
					ps = append(ps, fmt.Sprintf("%d (%s)", p.Port, p.Name))
				}
				return nil, fmt.Errorf("%w: --to %q: service %s has no port %q; its ports: %s", ErrInput, to, name, portText, strings.Join(ps, ", "))
			}
		}
		a.To, a.Port, a.Cells = name, port, m.To(name, port)
	}
	if a.Cells == nil {
		a.Cells = []Cell{}
	}
	return a, nil
}

// known lists the services of a kind (every kind if empty) for an error.
func (m *Matrix) known(kind string) string {
	var ids []string
	for _, s := range m.Services {
		if kind == "" || s.Kind == kind {
			ids = append(ids, s.ID)
		}
	}
	if len(ids) == 0 {
		return "the mesh has none"
	}
	what := "no such service or caller; the mesh has"
	if kind == KindService {
		what = "no such service; the mesh's services are"
	}
	return what + " " + strings.Join(ids, ", ")
}

// WriteAnswer writes the answer as a table, then the conditions of each
// conditional cell.
func WriteAnswer(w io.Writer, a *Answer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tTO\tPORT\tVERDICT\tPOLICY\tRULE\tREASON")
	for _, c := range a.Cells {
		pol, rule := c.Policy, "-"
		if pol == "" {
			pol = "-"
		}
		if c.Rule != nil {
			rule = strconv.Itoa(*c.Rule)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", c.From, c.To, c.Port, c.Verdict, pol, rule, c.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(a.Cells) == 0 {
		if _, err := fmt.Fprintln(w, "(no cells: the service has no callers, or the caller no service to call)"); err != nil {
			return err
		}
	}
	for _, c := range a.Cells {
		if len(c.Conditions) == 0 {
			continue
		}
		if _, err := fmt.Fprintf(w, "\n%s -> %s:%d is %s:\n", c.From, c.To, c.Port, c.Verdict); err != nil {
			return err
		}
		for _, s := range c.Conditions {
			if _, err := fmt.Fprintf(w, "  %s\n", s); err != nil {
				return err
			}
		}
	}
	return nil
}
