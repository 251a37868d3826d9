package journal

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
)

// Finding is one way the stored log departs from what was signed.
type Finding struct {
	// Kind is "missing-entry", "altered-entry", "checkpoint-mismatch",
	// "forged-checkpoint", "truncated", "unsigned-entries" or
	// "inconsistent-checkpoints".
	Kind string `json:"kind"`
	// From and To bound the entries concerned, [From, To).
	From   uint64 `json:"from"`
	To     uint64 `json:"to"`
	Detail string `json:"detail"`
}

// Report is the result of verifying a journal.
type Report struct {
	Entries     uint64 `json:"entries"`
	Checkpoints int    `json:"checkpoints"`
	// Witnessed is the largest size vouched for by a witness checkpoint.
	Witnessed uint64    `json:"witnessed"`
	Findings  []Finding `json:"findings"`
}

// OK reports whether nothing was found.
func (r *Report) OK() bool { return len(r.Findings) == 0 }

// Verify recomputes the log from its stored entries and checks it against
// every stored checkpoint and every witness checkpoint, all of which must be
// signed by vkey. It proves consistency between consecutive checkpoints, and
// says where the log departs from what was signed.
func Verify(ctx context.Context, s *Store, vkey string, witness [][]byte) (*Report, error) {
	leaves, rep, err := loadLeaves(ctx, s)
	if err != nil {
		return nil, err
	}
	stored, err := s.Checkpoints(ctx)
	if err != nil {
		return nil, err
	}
	rep.Checkpoints = len(stored)
	type signed struct {
		cp     Checkpoint
		source string
	}
	var cps []signed
	for _, c := range stored {
		cp, err := ParseCheckpoint(c.Note, vkey)
		if err != nil || cp.Size != c.Size {
			rep.Findings = append(rep.Findings, Finding{Kind: "forged-checkpoint", From: c.Size, To: c.Size,
				Detail: fmt.Sprintf("the stored checkpoint at size %d does not carry a valid signature for it: %v", c.Size, err)})
			continue
		}
		cps = append(cps, signed{cp, "stored"})
	}
	for i, w := range witness {
		cp, err := ParseCheckpoint(w, vkey)
		if err != nil {
			rep.Findings = append(rep.Findings, Finding{Kind: "forged-checkpoint",
				Detail: fmt.Sprintf("witness checkpoint %d is not validly signed: %v", i+1, err)})
			continue
		}
		if cp.Size > rep.Witnessed {
			rep.Witnessed = cp.Size
		}
		cps = append(cps, signed{cp, "witness"})
	}
	sort.SliceStable(cps, func(i, j int) bool { return cps[i].cp.Size < cps[j].cp.Size })

	n := uint64(len(leaves))
	f := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	rng := f.NewEmptyRange(0)
	var good Checkpoint // the last checkpoint that matched
	var last uint64
	for _, c := range cps {
		if c.cp.Size > n {
			rep.Findings = append(rep.Findings, Finding{Kind: "truncated", From: n, To: c.cp.Size,
				Detail: fmt.Sprintf("a %s checkpoint covers %d entries but the log holds %d: entries %d to %d were cut off", c.source, c.cp.Size, n, n, c.cp.Size-1)})
			continue
		}
		for rng.End() < c.cp.Size {
			if err := rng.Append(leaves[rng.End()], nil); err != nil {
				return nil, fmt.Errorf("journal: verify: %w", err)
			}
		}
		root, err := rng.GetRootHash(nil)
		if err != nil {
			return nil, fmt.Errorf("journal: verify: %w", err)
		}
		if !bytes.Equal(root, c.cp.Root) {
			rep.Findings = append(rep.Findings, Finding{Kind: "checkpoint-mismatch", From: good.Size, To: c.cp.Size,
				Detail: fmt.Sprintf("the first %d entries do not hash to the root of their %s checkpoint: an entry in [%d, %d) was changed, inserted, deleted or reordered",
					c.cp.Size, c.source, good.Size, c.cp.Size)})
			continue
		}
		if good.Size > 0 && good.Size < c.cp.Size {
			p, err := ConsistencyProof(leaves[:c.cp.Size], good.Size)
			if err == nil {
				err = proof.VerifyConsistency(rfc6962.DefaultHasher, good.Size, c.cp.Size, p, good.Root, c.cp.Root)
			}
			if err != nil {
				rep.Findings = append(rep.Findings, Finding{Kind: "inconsistent-checkpoints", From: good.Size, To: c.cp.Size,
					Detail: fmt.Sprintf("no consistency proof from size %d to %d: %v", good.Size, c.cp.Size, err)})
				continue
			}
		}
		good = c.cp
		if c.cp.Size > last {
			last = c.cp.Size
		}
	}
	if last < n {
		rep.Findings = append(rep.Findings, Finding{Kind: "unsigned-entries", From: last, To: n,
			Detail: fmt.Sprintf("entries %d to %d are covered by no valid checkpoint", last, n-1)})
	}
	return rep, nil
}

// loadLeaves reads every entry, recomputes its leaf hash, and notes entries
// that are missing or whose body no longer matches the hash written with it.
func loadLeaves(ctx context.Context, s *Store) ([][]byte, *Report, error) {
	rep := &Report{}
	var leaves [][]byte
	var next uint64
	for {
		page, err := s.Entries(ctx, next, 10000)
		if err != nil {
			return nil, nil, err
		}
		if len(page) == 0 {
			break
		}
		for _, e := range page {
			if e.Index != uint64(len(leaves)) {
				rep.Findings = append(rep.Findings, Finding{Kind: "missing-entry", From: uint64(len(leaves)), To: e.Index,
					Detail: fmt.Sprintf("entries %d to %d are missing", len(leaves), e.Index-1)})
			}
			h := rfc6962.DefaultHasher.HashLeaf(e.Body)
			if !bytes.Equal(h, e.LeafHash) {
				rep.Findings = append(rep.Findings, Finding{Kind: "altered-entry", From: e.Index, To: e.Index + 1,
					Detail: fmt.Sprintf("entry %d no longer matches the leaf hash written with it", e.Index)})
			}
			leaves = append(leaves, h)
			next = e.Index + 1
		}
	}
	rep.Entries = uint64(len(leaves))
	return leaves, rep, nil
}

// subtreeHash is the RFC 6962 hash of the leaves a node covers.
func subtreeHash(leaves [][]byte, id compact.NodeID) ([]byte, error) {
	begin, end := id.Coverage()
	// A perfect subtree hashes the same wherever it sits, and only ranges
	// that start at zero yield a root.
	f := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	r := f.NewEmptyRange(0)
	for i := begin; i < end; i++ {
		if err := r.Append(leaves[i], nil); err != nil {
			return nil, err
		}
	}
	return r.GetRootHash(nil)
}

func proofHashes(leaves [][]byte, nodes proof.Nodes) ([][]byte, error) {
	hashes := make([][]byte, 0, len(nodes.IDs))
	for _, id := range nodes.IDs {
		h, err := subtreeHash(leaves, id)
		if err != nil {
			return nil, err
		}
		hashes = append(hashes, h)
	}
	return nodes.Rehash(hashes, rfc6962.DefaultHasher.HashChildren)
}

// ConsistencyProof proves that the log of len(leaves) entries extends its
// first size1 entries.
func ConsistencyProof(leaves [][]byte, size1 uint64) ([][]byte, error) {
	nodes, err := proof.Consistency(size1, uint64(len(leaves)))
	if err != nil {
		return nil, err
	}
	return proofHashes(leaves, nodes)
}

// InclusionProof is everything an outsider needs to check that an entry is
// in the log: the entry, its index, the proof hashes and a signed checkpoint.
type InclusionProof struct {
	Index      uint64   `json:"index"`
	Entry      string   `json:"entry"` // base64 of the exact leaf bytes
	Hashes     []string `json:"hashes"`
	Checkpoint string   `json:"checkpoint"` // the signed note
}

// Prove returns an inclusion proof of the issuance of serial against the
// latest stored checkpoint that covers it.
func Prove(ctx context.Context, s *Store, serial string) (*InclusionProof, error) {
	e, err := s.issuanceEntry(ctx, serial)
	if err != nil {
		return nil, err
	}
	stored, err := s.Checkpoints(ctx)
	if err != nil {
		return nil, err
	}
	if len(stored) == 0 || stored[len(stored)-1].Size <= e.Index {
		return nil, fmt.Errorf("journal: no checkpoint covers entry %d yet", e.Index)
	}
	cp := stored[len(stored)-1]
	leaves, _, err := loadLeaves(ctx, s)
	if err != nil {
		return nil, err
	}
	if uint64(len(leaves)) < cp.Size {
		return nil, fmt.Errorf("%w: the log is shorter than its latest checkpoint", ErrTampered)
	}
	nodes, err := proof.Inclusion(e.Index, cp.Size)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	hashes, err := proofHashes(leaves[:cp.Size], nodes)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	p := &InclusionProof{Index: e.Index, Entry: base64.StdEncoding.EncodeToString(e.Body), Checkpoint: string(cp.Note)}
	for _, h := range hashes {
		p.Hashes = append(p.Hashes, base64.StdEncoding.EncodeToString(h))
	}
	return p, nil
}

// CheckProof verifies an inclusion proof with the public checkpoint key
// alone: the checkpoint's signature, then the path from the entry's leaf hash
// to the checkpoint's root. It returns the entry's bytes.
func CheckProof(p *InclusionProof, vkey string) ([]byte, error) {
	cp, err := ParseCheckpoint([]byte(p.Checkpoint), vkey)
	if err != nil {
		return nil, err
	}
	entry, err := base64.StdEncoding.DecodeString(p.Entry)
	if err != nil {
		return nil, fmt.Errorf("journal: proof entry: %w", err)
	}
	hashes := make([][]byte, 0, len(p.Hashes))
	for _, h := range p.Hashes {
		b, err := base64.StdEncoding.DecodeString(h)
		if err != nil {
			return nil, fmt.Errorf("journal: proof hash: %w", err)
		}
		hashes = append(hashes, b)
	}
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, p.Index, cp.Size, rfc6962.DefaultHasher.HashLeaf(entry), hashes, cp.Root); err != nil {
		return nil, fmt.Errorf("journal: inclusion proof: %w", err)
	}
	return entry, nil
}

// MarshalProof is the JSON form `trustmesh audit prove` prints.
func MarshalProof(p *InclusionProof) ([]byte, error) { return json.MarshalIndent(p, "", "  ") }
