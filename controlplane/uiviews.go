package controlplane

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/internal/serial"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/ui"
)

// The adapters from the control plane's parts to the web UI's views.

// uiIdentities reads the rotation audit.
type uiIdentities struct {
	sh    *uiShared
	cache viewCache[journalKey, []ui.Identity]
}

func (u *uiIdentities) Identities(ctx context.Context, now time.Time) ([]ui.Identity, error) {
	key, err := u.sh.journalKey(ctx, now)
	if err != nil {
		return nil, err
	}
	return u.cache.get(ctx, u.sh.slots, key, func(ctx context.Context) ([]ui.Identity, error) {
		rep, _, _, err := u.sh.journalScan(ctx, now)
		if err != nil {
			return nil, err
		}
		ids := make([]ui.Identity, 0, len(rep.Identities))
		for _, a := range rep.Identities {
			ids = append(ids, ui.IdentityFromAudit(a, now))
		}
		return ids, nil
	})
}

// uiCA reads the CA's generations from the rotation manager, its rotations
// from the journal and what expires next from both.
type uiCA struct {
	sh    *uiShared
	cache viewCache[journalKey, *ui.CAView]
}

// nextWorkloadExpiries is how many workload certificates' expiries the CA
// view's timeline shows.
const nextWorkloadExpiries = 5

func (u *uiCA) CA(ctx context.Context, now time.Time) (*ui.CAView, error) {
	key, err := u.sh.journalKey(ctx, now)
	if err != nil {
		return nil, err
	}
	return u.cache.get(ctx, u.sh.slots, key, func(ctx context.Context) (*ui.CAView, error) { return u.compute(ctx, now) })
}

func (u *uiCA) compute(ctx context.Context, now time.Time) (*ui.CAView, error) {
	mat, st, err := u.sh.cp.rotation.Certificates(ctx, now)
	if err != nil {
		return nil, fmt.Errorf("the CA's rotation state: %w", err)
	}
	rep, rots, signed, err := u.sh.journalScan(ctx, now)
	if err != nil {
		return nil, err
	}
	v := &ui.CAView{Generations: []ui.Generation{}, Events: []ui.CAEvent{}, NextExpiries: []ui.Expiry{}}
	states := map[string]string{}
	for _, c := range admin.CACerts(mat, st) {
		states[c.Role+"/"+c.Serial] = c.State
	}
	shown := map[string]bool{}
	add := func(role string, c *x509.Certificate) {
		sn := formatSerial(c)
		shown[role+"/"+sn] = true
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

	// The CA's creation is the first event: its first root, the one in
	// force that no prepare step brought in (valid from its NotBefore,
	// which the CA backdates a little). Once that root has been retired
	// and dropped from the bundle, the journal's steps begin the list.
	preparedRoots := map[string]bool{}
	for _, r := range rots {
		if r.Step == "prepare" && r.Role == "root" {
			preparedRoots[r.Serial] = true
		}
	}
	active := map[string]string{} // role -> serial in force
	var first *x509.Certificate
	for _, r := range mat.Roots {
		if !preparedRoots[formatSerial(r)] && (first == nil || r.NotBefore.Before(first.NotBefore)) {
			first = r
		}
	}
	if first != nil {
		active["root"] = formatSerial(first)
		v.Events = append(v.Events, ui.CAEvent{Time: first.NotBefore.UTC(), Kind: "create",
			Detail: fmt.Sprintf("CA created: root %s (serial %s, expires %s)", first.Subject.CommonName, formatSerial(first), first.NotAfter.UTC().Format(time.RFC3339))})
	}

	// The journal's steps, oldest first. An activation records the whole
	// chain, so an intermediate's activation repeats the root in force:
	// an activation of what is already active is no event.
	var prepared *journal.Rotation
	for i, r := range rots {
		if r.Step == "activate" {
			if active[r.Role] == r.Serial {
				continue
			}
			active[r.Role] = r.Serial
		}
		v.Events = append(v.Events, ui.CAEvent{Time: r.Time.UTC(), Kind: r.Step,
			Detail: fmt.Sprintf("%s %s (serial %s, expires %s)", r.Role, r.Subject, r.Serial, r.NotAfter.UTC().Format(time.RFC3339))})
		if r.Role != "intermediate" {
			continue
		}
		switch r.Step {
		case "prepare":
			prepared = &rots[i]
		case "activate":
			if prepared != nil && prepared.Serial == r.Serial {
				prepared = nil
			}
		}
	}
	// Intermediates no longer in force: their chain is no longer served,
	// but the certificates they signed stay valid until they expire, so
	// each shows as retiring until the last of them (the journal names
	// each certificate's issuer) expires, at most until its own NotAfter.
	// The journal names an intermediate it saw prepared; the CA's first
	// one predates the journal's rotation steps.
	recorded := map[string]journal.Rotation{}
	for _, r := range rots {
		if r.Role == "intermediate" {
			recorded[r.Serial] = r
		}
	}
	for _, is := range sortedKeys(signed) {
		until := signed[is]
		if shown["intermediate/"+is] || (prepared != nil && prepared.Serial == is) || preparedRoots[is] || active["root"] == is {
			continue
		}
		g := ui.Generation{Role: "intermediate", Serial: is, State: "retiring", NotAfter: until.UTC(),
			Subject: "(the CA's first intermediate: the journal records no rotation step of it)"}
		if r, ok := recorded[is]; ok {
			g.Subject, g.NotAfter = r.Subject, r.NotAfter.UTC()
			if until.After(r.NotAfter) {
				until = r.NotAfter
			}
		}
		if !until.After(now) {
			continue
		}
		v.Generations = append(v.Generations, g)
		v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "the last certificate signed by the retiring intermediate " + is + " expires", At: until.UTC()})
	}
	// A prepared intermediate, under the active root or under a prepared
	// one, is not in the material in force: the prepared generation holds
	// it, and the journal names it should that not be readable.
	if next, err := u.sh.cp.rotation.PreparedCertificates(ctx); err == nil && next != nil {
		for _, c := range next.Chain {
			if !shown["intermediate/"+formatSerial(c)] {
				states["intermediate/"+formatSerial(c)] = "prepared"
				add("intermediate", c)
			}
		}
	} else if st.Next != 0 && prepared != nil {
		v.Generations = append(v.Generations, ui.Generation{Role: "intermediate", Subject: prepared.Subject, Serial: prepared.Serial,
			NotAfter: prepared.NotAfter.UTC(), State: "prepared"})
	}
	for _, g := range v.Generations {
		if g.NotAfter.After(now) {
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: fmt.Sprintf("%s %s (%s) expires", g.Role, g.Subject, g.State), At: g.NotAfter})
		}
	}
	if plan, err := u.sh.cp.rotation.Plan(ctx, now); err == nil {
		switch {
		case plan.Due != rotation.Nothing:
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "rotation step due: " + plan.Due.String(), At: plan.DueSince.UTC()})
		case plan.Next != rotation.Nothing:
			v.NextExpiries = append(v.NextExpiries, ui.Expiry{What: "next rotation step: " + plan.Next.String(), At: plan.At.UTC()})
		}
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
	sort.SliceStable(v.Events, func(i, j int) bool { return v.Events[i].Time.Before(v.Events[j].Time) })
	return v, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
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
		// A tlog-witness's verdict: the latest checkpoint whose cosignature
		// verified with --witness-key (kept in the data directory).
		if st.Cosigned > 0 {
			v.Witness.State += fmt.Sprintf("; cosigned by the witness at size %d, %s", st.Cosigned, st.CosignedAt.UTC().Format(time.RFC3339))
		} else if journal.IsURL(u.witness) {
			v.Witness.State += "; not cosigned by the witness yet"
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
	var cosignature []ui.Finding
	switch {
	case u.witness == "":
	case !journal.IsURL(u.witness):
		if b, err := os.ReadFile(u.witness); err == nil {
			witness = append(witness, b)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("the witness's checkpoint: %w", err)
		}
	default:
		// A tlog-witness serves nothing back: hold the journal to the
		// checkpoint it last cosigned, as serve keeps it, once both its
		// signatures verify (as trustmesh check does).
		b, err := os.ReadFile(filepath.Join(string(u.dir), journal.WitnessCosignedFile))
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return nil, fmt.Errorf("the witness's cosigned checkpoint: %w", err)
		default:
			if _, err := journal.OpenCosigned(b, key, u.cp.cfg.Journal.WitnessKey); err != nil {
				cosignature = append(cosignature, ui.Finding{Detail: "witness-cosignature: the cosigned checkpoint in " + journal.WitnessCosignedFile + " does not verify: " + err.Error()})
			} else {
				witness = append(witness, b)
			}
		}
	}
	rep, err := journal.Verify(ctx, u.cp.journal, key, witness)
	if err != nil {
		return nil, err
	}
	res := &ui.VerifyResult{Checked: rep.Entries, Findings: append([]ui.Finding{}, cosignature...)}
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
	sh       *uiShared
	policies *source.Feed
	mesh     *mesh.Feed
	rootNS   string
	// redact shows the conditions' values as the decision log would.
	redact *decisionlog.Redactor

	cache viewCache[accessKey, *accessState]
}

type accessKey struct{ pv, mv uint64 }

// accessState is one matrix, its view, and the index that names the
// services of a denial's sides with the matrix's own IDs.
type accessState struct {
	view  *ui.AccessView
	index *serviceIndex
}

func (u *uiAccess) Access(ctx context.Context) (*ui.AccessView, error) {
	st, err := u.state(ctx)
	if err != nil {
		return nil, err
	}
	return st.view, nil
}

func (u *uiAccess) state(ctx context.Context) (*accessState, error) {
	var pols []*policy.Policy
	var pv, mv uint64
	// Before a feed's first snapshot there is nothing to compute from: an
	// empty policy set would show every call allowed.
	if u.policies != nil {
		s := u.policies.Current()
		if s == nil {
			return nil, fmt.Errorf("the policies are %w", ui.ErrNotLoaded)
		}
		pols, pv = s.Policies, s.Version
	}
	m := &mesh.Mesh{}
	if u.mesh != nil {
		s := u.mesh.Current()
		if s == nil {
			return nil, fmt.Errorf("the mesh is %w", ui.ErrNotLoaded)
		}
		m, mv = s.Mesh, s.Version
	}
	return u.cache.get(ctx, u.sh.slots, accessKey{pv, mv}, func(context.Context) (*accessState, error) {
		mat, err := access.Compute(pols, m, access.Options{RootNamespace: u.rootNS, PolicyVersion: pv, MeshVersion: mv, Redact: u.redact})
		if err != nil {
			return nil, err
		}
		return &accessState{
			view:  &ui.AccessView{PolicyVersion: mat.PolicyVersion, MeshVersion: mat.MeshVersion, Services: mat.Services, Cells: mat.Cells},
			index: newServiceIndex(mat, m),
		}, nil
	})
}
