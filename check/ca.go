package check

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/internal/human"
)

// The codes of the CA, journal and witness checks.
const (
	CodeCARead         = "TM-CA-001"
	CodeRoot           = "TM-CA-002"
	CodeIntermediate   = "TM-CA-003"
	CodeRotation       = "TM-CA-004"
	CodeJournalOpen    = "TM-JNL-001"
	CodeJournalIntact  = "TM-JNL-002"
	CodeCheckpointAge  = "TM-JNL-003"
	CodeWitnessReach   = "TM-WIT-001"
	CodeWitnessConsist = "TM-WIT-002"
	CodeWitnessBehind  = "TM-WIT-003"
	// CodeWitnessCosigned judges the checkpoint a tlog-witness (a URL
	// --witness) last cosigned, as serve keeps it: verified with
	// --witness-key (error when it does not verify), or missing (warning).
	CodeWitnessCosigned = "TM-WIT-004"
)

// overdueAfter is how long a due rotation step may wait before it is a
// warning: serve takes a due step within one rotation interval (a minute
// by default).
const overdueAfter = time.Hour

// checkCA judges the active root and intermediate against MinValidity and
// reports the rotation policy's plan (rotation.Manager.Plan).
func checkCA(ctx context.Context, cfg Config, r *Report) {
	st, plan, err := admin.RotationPlan(ctx, cfg.DataDir, cfg.Journal, cfg.Now)
	if err != nil {
		r.add(CodeCARead, Error, string(cfg.DataDir),
			"serve keeps the CA in --data-dir, or in the Secret named by --ca-secret; point check at the same place",
			"the CA cannot be read: %v", err)
		return
	}
	r.add(CodeCARead, OK, string(cfg.DataDir), "", "the CA's certificates and rotation state are readable")
	for _, c := range st.CA {
		if c.State != "active" {
			continue // prepared and retiring roots are the rotation's business
		}
		code, hint := CodeIntermediate, "rotate it: trustmesh ca rotate --prepare, then --activate (a running serve rotates on schedule; is it running?)"
		if c.Role == "root" {
			code, hint = CodeRoot, "rotate the root: trustmesh ca rotate --prepare --root, then --activate once it has propagated (a running serve does this on schedule; is it running?)"
		}
		subject := c.Role + " " + c.Serial
		switch left := c.NotAfter.Sub(cfg.Now); {
		case left <= 0:
			r.add(code, Error, subject, hint, "expired at %s; nothing it signed verifies", human.Time(c.NotAfter))
		case left < cfg.MinValidity:
			r.add(code, Warning, subject, hint+"; with short-lived CA certificates, lower --min-validity",
				"expires at %s, in %s: within --min-validity %s", human.Time(c.NotAfter), human.Duration(left), human.Duration(cfg.MinValidity))
		default:
			r.add(code, OK, subject, "", "valid until %s (%s left)", human.Time(c.NotAfter), human.Duration(left))
		}
	}
	r.Rotation = &plan
	switch {
	case plan.Due != rotation.Nothing && cfg.Now.Sub(plan.DueSince) > overdueAfter:
		r.add(CodeRotation, Warning, "rotation", "serve takes a due step within one rotation interval: is serve running, and is one replica the leader? Or take it by hand with trustmesh ca rotate",
			"%s has been due since %s (%s ago) and was not taken", plan.Due, human.Time(plan.DueSince), human.Duration(cfg.Now.Sub(plan.DueSince)))
	case plan.Due != rotation.Nothing:
		r.add(CodeRotation, Info, "rotation", "", "%s is due now (since %s); serve takes it within one rotation interval", plan.Due, human.Time(plan.DueSince))
	case plan.Next != rotation.Nothing:
		r.add(CodeRotation, Info, "rotation", "", "next step: %s at %s (in %s)", plan.Next, human.Time(plan.At), human.Duration(plan.At.Sub(cfg.Now)))
	default:
		r.add(CodeRotation, Info, "rotation", "operator-supplied CA material is replaced by its operator: trustmesh ca rotate --prepare --cacerts DIR",
			"no rotation step is scheduled")
	}
}

// checkJournal opens the journal as the audit commands do, verifies it
// against its signed checkpoints (journal.Verify, as trustmesh audit
// verify), judges the age of the last checkpoint and checks the witness.
// It returns the journal's trust domain, zero when it cannot be opened.
func checkJournal(ctx context.Context, cfg Config, r *Report) spiffeid.TrustDomain {
	store, td, err := cfg.DataDir.OpenExisting(ctx, cfg.Journal)
	if err != nil {
		r.add(CodeJournalOpen, Error, string(cfg.DataDir),
			"point --data-dir (and --journal-dsn) at what serve uses; trustmesh serve creates the journal on first start",
			"the journal cannot be opened: %v", err)
		return spiffeid.TrustDomain{}
	}
	defer store.Close()
	r.add(CodeJournalOpen, OK, string(cfg.DataDir), "", "the journal of trust domain %s opens", td)

	key, err := admin.CheckpointKey(cfg.DataDir, "")
	if err != nil {
		r.add(CodeJournalIntact, Error, "journal", "serve publishes the verifier key as checkpoint.pub in --data-dir",
			"the journal cannot be verified: %v", err)
		return td
	}
	base, err := journal.Verify(ctx, store, key, nil)
	if err != nil {
		r.add(CodeJournalIntact, Error, "journal", "run trustmesh audit verify for details", "the journal cannot be verified: %v", err)
		return td
	}
	for _, f := range base.Findings {
		r.add(CodeJournalIntact, Error, fmt.Sprintf("entries [%d, %d)", f.From, f.To),
			"the journal no longer matches what was signed: run trustmesh audit verify; the CA refuses to issue until an operator acts (SECURITY.md)",
			"%s: %s", f.Kind, f.Detail)
	}
	if base.OK() {
		r.add(CodeJournalIntact, OK, "journal", "", "%d entries match their %d signed checkpoints", base.Entries, base.Checkpoints)
	}

	cps, err := store.Checkpoints(ctx)
	var last journal.StoredCheckpoint
	switch {
	case err != nil:
		r.add(CodeCheckpointAge, Error, "journal", "", "the checkpoints cannot be read: %v", err)
	case len(cps) == 0:
		r.add(CodeCheckpointAge, Info, "journal", "every issuance signs a checkpoint; start trustmesh serve", "the journal has no checkpoint yet")
	default:
		last = cps[len(cps)-1]
		subject := fmt.Sprintf("checkpoint at size %d", last.Size)
		if age := cfg.Now.Sub(last.Time); age > cfg.MaxCheckpointAge {
			r.add(CodeCheckpointAge, Warning, subject,
				"every issuance signs a checkpoint, and agents renew well within a day: is serve running, and can agents reach it? (--max-checkpoint-age)",
				"the last checkpoint was signed %s ago, at %s: over --max-checkpoint-age %s", human.Duration(age), human.Time(last.Time), human.Duration(cfg.MaxCheckpointAge))
		} else {
			r.add(CodeCheckpointAge, OK, subject, "", "the last checkpoint was signed %s ago", human.Duration(max(age, 0)))
		}
	}
	checkWitness(ctx, cfg, r, store, key, base, last.Size)
	checkClock(ctx, cfg, r, store)
	return td
}

// checkWitness holds the journal to what the witness saw. A file witness
// keeps serve's checkpoints itself: its copy is read. A URL witness is a
// C2SP tlog-witness, which takes checkpoints but serves nothing back:
// check reads the checkpoint it last cosigned, as serve keeps it in the
// data directory (journal.WitnessCosignedFile), and verifies both
// signatures with the journal's key and --witness-key. Either way the
// findings journal.Verify adds with the witness's checkpoint are the
// witness's.
func checkWitness(ctx context.Context, cfg Config, r *Report, store *journal.Store, key string, base *journal.Report, latest uint64) {
	if cfg.Witness == "" {
		r.add(CodeWitnessReach, Info, "witness", "pass serve's --witness to check it", "no --witness given; the witness was not checked")
		return
	}
	// The subject names the witness without the credentials its URL may
	// carry (user information, query).
	subject := journal.RedactTarget(cfg.Witness)
	var signed []byte
	if journal.IsURL(cfg.Witness) {
		signed = readCosigned(cfg, r, subject, key, latest)
		if signed == nil {
			return
		}
	} else {
		b, err := readWitnessFile(cfg.Witness)
		if err != nil {
			r.add(CodeWitnessReach, Error, subject, "serve exports every checkpoint there; check the path, and serve's log for export errors",
				"the witness cannot be read: %v", err)
			return
		}
		r.add(CodeWitnessReach, OK, subject, "", "the witness holds a checkpoint")
		signed = b
	}
	cp, err := journal.ParseCheckpoint(signed, key)
	if err != nil {
		r.add(CodeWitnessConsist, Error, subject, "the witness is another journal's, or its copy was altered: check --witness",
			"the witness's checkpoint is not signed by this journal's key: %v", err)
		return
	}
	rep, err := journal.Verify(ctx, store, key, [][]byte{signed})
	if err != nil {
		r.add(CodeWitnessConsist, Error, subject, "", "the journal cannot be verified against the witness: %v", err)
		return
	}
	consistent := true
	for _, f := range rep.Findings {
		if !containsFinding(base.Findings, f) {
			consistent = false
			r.add(CodeWitnessConsist, Error, subject,
				"the journal was rewritten or rolled back after the witness saw it: run trustmesh audit verify --checkpoint with the witness's checkpoint, and treat it as an incident (SECURITY.md)",
				"possible rewrite or rollback: the journal does not extend the witness's checkpoint at size %d: %s: %s", cp.Size, f.Kind, f.Detail)
		}
	}
	if !consistent {
		return
	}
	r.add(CodeWitnessConsist, OK, subject, "", "the journal is consistent with the witness's checkpoint at size %d", cp.Size)
	if cp.Size < latest {
		r.add(CodeWitnessBehind, Warning, subject, "serve exports checkpoints off the commit path; if this persists, serve cannot reach the witness or the witness refuses it (see serve's log and trustmesh_journal_witness_failures_total)",
			"the witness is at size %d, the journal's last checkpoint at %d", cp.Size, latest)
	}
}

// readCosigned reads and verifies the checkpoint a tlog-witness last
// cosigned, as serve keeps it in the data directory. It returns nil when
// there is none to hold the journal to, having said why.
func readCosigned(cfg Config, r *Report, subject, key string, latest uint64) []byte {
	file := filepath.Join(string(cfg.DataDir), journal.WitnessCosignedFile)
	if cfg.WitnessKey == "" {
		r.add(CodeWitnessCosigned, Error, subject, "pass serve's --witness-key: the witness's cosignature/v1 verifier key",
			"a tlog-witness's cosignature cannot be verified without its key; the witness was not checked")
		return nil
	}
	b, err := readWitnessFile(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.add(CodeWitnessCosigned, Warning, subject,
			"serve pushes every checkpoint to the witness and keeps what it cosigns in "+journal.WitnessCosignedFile+": is serve running with this --witness and --witness-key? See its log and trustmesh_journal_witness_failures_total",
			"the witness has cosigned no checkpoint yet; the journal's last checkpoint is at size %d", latest)
		return nil
	case err != nil:
		r.add(CodeWitnessCosigned, Error, subject, "serve keeps the witness's cosigned checkpoint in --data-dir; check the file",
			"the witness's cosigned checkpoint cannot be read: %v", err)
		return nil
	}
	c, err := journal.OpenCosigned(b, key, cfg.WitnessKey)
	if err != nil {
		r.add(CodeWitnessCosigned, Error, subject,
			"the file was altered, or --witness-key is not the witness's key: compare with serve's --witness-key; run trustmesh audit cosigned",
			"the cosigned checkpoint in %s does not verify: %v", journal.WitnessCosignedFile, err)
		return nil
	}
	r.add(CodeWitnessCosigned, OK, subject, "", "cosigned by the witness %s at size %d, %s", c.Witness, c.Size, human.Time(c.At))
	return b
}
func containsFinding(fs []journal.Finding, f journal.Finding) bool {
	for _, g := range fs {
		if g == f {
			return true
		}
	}
	return false
}

// maxWitness bounds what is read of a witness's checkpoint: a checkpoint
// is a few hundred bytes.
const maxWitness = 64 << 10

// readWitnessFile reads a checkpoint file: a file witness's copy, or the
// cosigned checkpoint serve keeps.
func readWitnessFile(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("check: witness: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxWitness+1))
	if err != nil {
		return nil, fmt.Errorf("check: witness: %w", err)
	}
	if len(b) > maxWitness || len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("check: witness: %s is not a checkpoint", name)
	}
	return b, nil
}
