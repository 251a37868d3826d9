package controlplane

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/internal/serial"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/ui"
)

// The adapters from the control plane's parts to the web UI's views.

// uiIdentities reads the rotation audit, at most once a second.
type uiIdentities struct {
	cp *ControlPlane

	mu   sync.Mutex
	at   time.Time
	size uint64
	ids  []ui.Identity
}

func (u *uiIdentities) Identities(ctx context.Context, now time.Time) ([]ui.Identity, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	size, err := u.cp.journal.Size(ctx)
	if err != nil {
		return nil, err
	}
	if u.ids != nil && size == u.size && now.Sub(u.at) >= 0 && now.Sub(u.at) < time.Second {
		return u.ids, nil
	}
	rep, err := audit.Rotation(ctx, u.cp.journal, nil, now, 0)
	if err != nil {
		return nil, err
	}
	ids := make([]ui.Identity, 0, len(rep.Identities))
	for _, a := range rep.Identities {
		ids = append(ids, ui.IdentityFromAudit(a, now))
	}
	u.at, u.size, u.ids = now, size, ids
	return ids, nil
}

// uiCA reads the CA's generations from the rotation manager, its rotations
// from the journal and what expires next from both.
type uiCA struct{ cp *ControlPlane }

// nextWorkloadExpiries is how many workload certificates' expiries the CA
// view's timeline shows.
const nextWorkloadExpiries = 5

func (u *uiCA) CA(ctx context.Context, now time.Time) (*ui.CAView, error) {
	mat, st, err := u.cp.rotation.Certificates(ctx, now)
	if err != nil {
		return nil, fmt.Errorf("the CA's rotation state: %w", err)
	}
	v := &ui.CAView{}
	states := map[string]string{}
	for _, c := range admin.CACerts(mat, st) {
		states[c.Role+"/"+c.Serial] = c.State
	}
	add := func(role string, c *x509.Certificate) {
		sn := formatSerial(c)
		v.Generations = append(v.Generations, ui.Generation{
			Role: role, Subject: c.Subject.CommonName, Serial: sn, Fingerprint: fingerprint(c),
			NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC(), State: states[role+"/"+sn],
		})
	}
	for _, r := range mat.Roots {
		add("root", r)
	}
	for _, c := range mat.Chain {
		add("intermediate", c)
	}
	rots, err := audit.Rotations(ctx, u.cp.journal)
	if err != nil {
		return nil, err
	}
	var prepared *journal.Rotation
	for i, r := range rots {
		v.Events = append(v.Events, ui.CAEvent{Time: r.Time.UTC(), Kind: r.Step,
			Detail: fmt.Sprintf("%s %s (serial %s, expires %s)", r.Role, r.Subject, r.Serial, r.NotAfter.UTC().Format(time.RFC3339))})
		if r.Step == "prepare" && r.Role == "intermediate" {
			prepared = &rots[i]
		}
	}
	if st.Next != 0 && !st.NextIsRoot && prepared != nil {
		// A prepared intermediate is not in the material in force: the
		// journal names it.
		v.Generations = append(v.Generations, ui.Generation{Role: "intermediate", Subject: prepared.Subject, Serial: prepared.Serial,
			NotBefore: prepared.Time.UTC(), NotAfter: prepared.NotAfter.UTC(), State: "prepared"})
	}
	for _, g := range v.Generations {
		if g.NotAfter.After(now) {
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: fmt.Sprintf("%s %s (%s) expires", g.Role, g.Subject, g.State), At: g.NotAfter})
		}
	}
	if plan, err := u.cp.rotation.Plan(ctx, now); err == nil {
		switch {
		case plan.Due != rotation.Nothing:
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "rotation step due: " + plan.Due.String(), At: plan.DueSince.UTC()})
		case plan.Next != rotation.Nothing:
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "next rotation step: " + plan.Next.String(), At: plan.At.UTC()})
		}
	}
	rep, err := audit.Rotation(ctx, u.cp.journal, nil, now, 0)
	if err != nil {
		return nil, err
	}
	ids := rep.Identities
	sort.Slice(ids, func(i, j int) bool { return ids[i].Expires.Before(ids[j].Expires) })
	n := 0
	for _, id := range ids {
		if n == nextWorkloadExpiries {
			break
		}
		if id.Status != "revoked" && id.Expires.After(now) {
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "workload certificate of " + id.SPIFFEID + " expires", At: id.Expires.UTC()})
			n++
		}
	}
	sort.SliceStable(v.NextExpiries, func(i, j int) bool { return v.NextExpiries[i].At.Before(v.NextExpiries[j].At) })
	return v, nil
}

func formatSerial(c *x509.Certificate) string { return serial.Format(c.SerialNumber) }

// uiJournal summarises the journal and verifies it as `trustmesh audit
// verify` does: against the checkpoint key the data directory publishes,
// and the witness's copy when the witness is a file.
type uiJournal struct {
	cp      *ControlPlane
	dir     admin.DataDir
	witness string
}

func (u *uiJournal) Journal(ctx context.Context) (*ui.JournalView, error) {
	size, err := u.cp.journal.Size(ctx)
	if err != nil {
		return nil, err
	}
	v := &ui.JournalView{Size: size, Witness: ui.WitnessState{State: "not configured"}}
	c, err := u.cp.journal.LatestCheckpoint(ctx)
	switch {
	case errors.Is(err, journal.ErrNotFound):
	case err != nil:
		return nil, err
	default:
		v.Checkpoint = ui.Checkpoint{Size: c.Size, Text: string(c.Note)}
		if key, err := admin.CheckpointKey(u.dir, ""); err == nil {
			if parsed, err := journal.ParseCheckpoint(c.Note, key); err == nil {
				v.Checkpoint.RootHash = base64.StdEncoding.EncodeToString(parsed.Root)
			}
		}
	}
	if w := u.cp.witness; w != nil {
		st := w.Status()
		v.Witness = ui.WitnessState{Configured: true, Target: st.Target}
		switch {
		case st.LastError != "":
			v.Witness.State = fmt.Sprintf("failing since %s: %s", st.ErrorAt.UTC().Format(time.RFC3339), st.LastError)
		case st.LastExport.IsZero():
			v.Witness.State = "no export yet"
		default:
			v.Witness.State = fmt.Sprintf("exported size %d at %s", st.LastSize, st.LastExport.UTC().Format(time.RFC3339))
		}
	}
	return v, nil
}

func (u *uiJournal) Verify(ctx context.Context) (*ui.VerifyResult, error) {
	key, err := admin.CheckpointKey(u.dir, "")
	if err != nil {
		return nil, err
	}
	var witness [][]byte
	if u.witness != "" && !strings.HasPrefix(u.witness, "http://") && !strings.HasPrefix(u.witness, "https://") {
		if b, err := os.ReadFile(u.witness); err == nil {
			witness = append(witness, b)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("the witness's checkpoint: %w", err)
		}
	}
	rep, err := journal.Verify(ctx, u.cp.journal, key, witness)
	if err != nil {
		return nil, err
	}
	res := &ui.VerifyResult{Checked: rep.Entries, Findings: []ui.Finding{}}
	for _, f := range rep.Findings {
		fd := ui.Finding{Detail: f.Kind + ": " + f.Detail}
		if f.Kind != "forged-checkpoint" {
			from := f.From
			fd.Index = &from
		}
		res.Findings = append(res.Findings, fd)
	}
	return res, nil
}

// uiAccess computes authz/access's matrix over the policy and mesh
// snapshots in force, once per pair of versions.
type uiAccess struct {
	policies *source.Feed
	mesh     *mesh.Feed
	rootNS   string

	mu     sync.Mutex
	pv, mv uint64
	view   *ui.AccessView
}

func (u *uiAccess) Access(context.Context) (*ui.AccessView, error) {
	var pols []*policy.Policy
	var pv, mv uint64
	if u.policies != nil {
		if s := u.policies.Current(); s != nil {
			pols, pv = s.Policies, s.Version
		}
	}
	m := &mesh.Mesh{}
	if u.mesh != nil {
		if s := u.mesh.Current(); s != nil {
			m, mv = s.Mesh, s.Version
		}
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.view != nil && u.pv == pv && u.mv == mv {
		return u.view, nil
	}
	mat, err := access.Compute(pols, m, access.Options{RootNamespace: u.rootNS, PolicyVersion: pv, MeshVersion: mv})
	if err != nil {
		return nil, err
	}
	u.pv, u.mv = pv, mv
	u.view = &ui.AccessView{PolicyVersion: mat.PolicyVersion, MeshVersion: mat.MeshVersion, Services: mat.Services, Cells: mat.Cells}
	return u.view, nil
}

// uiDenials reads the decision log's recent denials and names the
// services of their sides from the mesh in force.
type uiDenials struct {
	log  *decisionlog.Logger
	mesh *mesh.Feed

	mu    sync.Mutex
	ver   uint64
	index *serviceIndex
}

func (u *uiDenials) Denials(limit int) ([]ui.Denial, bool, uint64) {
	if u.log == nil {
		return []ui.Denial{}, false, 0
	}
	idx := u.services()
	entries := u.log.Recent(limit)
	out := make([]ui.Denial, 0, len(entries))
	for _, e := range entries {
		out = append(out, ui.Denial{
			Time: e.Time.UTC(), DecisionID: e.DecisionID,
			Source:      ui.Peer{Principal: e.Source.Principal, Address: e.Source.Address},
			Destination: ui.Peer{Principal: e.Destination.Principal, Address: e.Destination.Address},
			Method:      e.Method, Host: e.Host, Path: e.Path, Policy: e.Policy, Rule: e.Rule, Action: e.Action, Reason: e.Reason,
			FromService: idx.name(e.Source.Address, e.Source.Principal),
			ToService:   idx.name(e.Destination.Address, e.Destination.Principal),
		})
	}
	return out, true, u.log.Dropped()
}

func (u *uiDenials) services() *serviceIndex {
	if u.mesh == nil {
		return &serviceIndex{}
	}
	s := u.mesh.Current()
	if s == nil {
		return &serviceIndex{}
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.index == nil || u.ver != s.Version {
		u.index, u.ver = newServiceIndex(s.Mesh), s.Version
	}
	return u.index
}

// serviceIndex names the service ("ns/name") behind an address or a SPIFFE
// ID, when exactly one service has it.
type serviceIndex struct {
	byAddr, byID map[string]string
}

func newServiceIndex(m *mesh.Mesh) *serviceIndex {
	idx := &serviceIndex{byAddr: map[string]string{}, byID: map[string]string{}}
	put := func(into map[string]string, k, svc string) {
		if k == "" {
			return
		}
		if old, ok := into[k]; ok && old != svc {
			into[k] = "" // ambiguous
			return
		}
		into[k] = svc
	}
	for _, s := range m.Services {
		for _, e := range s.Endpoints {
			put(idx.byAddr, e.Address, s.Key())
			if e.Workload != nil && !e.Workload.ID.IsZero() {
				put(idx.byID, e.Workload.ID.String(), s.Key())
			}
		}
	}
	return idx
}

func (idx *serviceIndex) name(addr, principal string) string {
	if s := idx.byAddr[addr]; s != "" {
		return s
	}
	return idx.byID[principal]
}
