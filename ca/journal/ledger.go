package journal

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"sync"
	"time"
)

// ledger is the journal as verified: the leaf hash of every entry that the
// signed tree covers, and the state that authentication rests on (join
// tokens, enrolments, revocations), derived from those entries alone. No
// decision reads a database row that it has not proven against it, and no
// mutable table holds that state: a writer of the database can neither add a
// token, nor clear a revocation, nor make an enrolment younger.
//
// Entries are added in log order by the committer (at Open, on catch-up and
// on append) and become visible to lookups only once published: once they
// are both durable and verified against a signed checkpoint, or appended by
// this store under its own new checkpoint. Until then truncate takes them
// back.
type ledger struct {
	mu sync.RWMutex
	// leaves are the verified leaf hashes, by index; the first published
	// are visible to lookups.
	leaves    [][32]byte
	published uint64
	tokens    map[string]*tokenState // by token id
	byHash    map[string]string      // hex token hash → token id
	// revocations are the indices of each identity's revocations, in order.
	revocations map[string][]revocationAt
	// undo takes back what unpublished entries added, newest last.
	undo []undoStep
}

type undoStep struct {
	idx  uint64
	undo func()
}

type tokenState struct {
	created uint64
	rec     JoinTokenCreated
	// redeemed is set by the first issuance that spent the token; that
	// issuance is the enrolment.
	redeemed   bool
	redemption uint64
	enrolledAt time.Time
}

type revocationAt struct {
	idx  uint64
	time time.Time
}

func newLedger() *ledger {
	return &ledger{tokens: map[string]*tokenState{}, byHash: map[string]string{}, revocations: map[string][]revocationAt{}}
}

// size is the number of entries added, published or not. Committer only.
func (l *ledger) size() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return uint64(len(l.leaves))
}

// add appends entry idx, unpublished, and what it says about tokens,
// enrolments and revocations. Entries must come in order.
func (l *ledger) add(idx uint64, leaf []byte, body []byte) error {
	facts, err := deriveFacts(idx, body)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if idx != uint64(len(l.leaves)) {
		return fmt.Errorf("journal: ledger: entry %d added after %d entries", idx, len(l.leaves))
	}
	var h [32]byte
	copy(h[:], leaf)
	l.leaves = append(l.leaves, h)
	switch rec := facts.(type) {
	case *JoinTokenCreated:
		// A token id is created once; a second creation of it counts for
		// nothing (CreateJoinToken refuses to write one).
		if _, dup := l.tokens[rec.TokenID]; dup {
			return nil
		}
		l.tokens[rec.TokenID] = &tokenState{created: idx, rec: *rec}
		if rec.TokenSHA256 != "" {
			if _, dup := l.byHash[rec.TokenSHA256]; !dup {
				l.byHash[rec.TokenSHA256] = rec.TokenID
				l.undo = append(l.undo, undoStep{idx, func() { delete(l.byHash, rec.TokenSHA256) }})
			}
		}
		l.undo = append(l.undo, undoStep{idx, func() { delete(l.tokens, rec.TokenID) }})
	case *Issuance:
		// Only the first issuance that spent a token enrols; redemption
		// never lets a second one through.
		t, ok := l.tokens[rec.EnrolmentID]
		if !ok || t.redeemed || rec.SPIFFEID != t.rec.SPIFFEID {
			return nil
		}
		t.redeemed, t.redemption, t.enrolledAt = true, idx, rec.Time
		l.undo = append(l.undo, undoStep{idx, func() { t.redeemed, t.redemption, t.enrolledAt = false, 0, time.Time{} }})
	case *Revocation:
		l.revocations[rec.SPIFFEID] = append(l.revocations[rec.SPIFFEID], revocationAt{idx: idx, time: rec.Time})
		id := rec.SPIFFEID
		l.undo = append(l.undo, undoStep{idx, func() {
			r := l.revocations[id]
			if len(r) <= 1 {
				delete(l.revocations, id)
				return
			}
			l.revocations[id] = r[:len(r)-1]
		}})
	}
	return nil
}

// publish makes every entry added so far visible to lookups.
func (l *ledger) publish() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.published = uint64(len(l.leaves))
	l.undo = nil
}

// truncate takes back the unpublished entries from n on.
func (l *ledger) truncate(n uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n < l.published {
		n = l.published
	}
	if n >= uint64(len(l.leaves)) {
		return
	}
	// Facts are undone newest first.
	for len(l.undo) > 0 && l.undo[len(l.undo)-1].idx >= n {
		l.undo[len(l.undo)-1].undo()
		l.undo = l.undo[:len(l.undo)-1]
	}
	l.leaves = l.leaves[:n]
}

// leaf returns the verified leaf hash of published entry idx.
func (l *ledger) leaf(idx uint64) ([32]byte, bool) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if idx >= l.published {
		return [32]byte{}, false
	}
	return l.leaves[idx], true
}

// publishedSize is how many entries lookups may rely on.
func (l *ledger) publishedSize() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.published
}

// deriveFacts returns the record an entry contributes to the ledger: a
// join-token creation, an issuance that redeemed a join token, a
// revocation, or nil. The kind is read from the verified body, never from
// the row's unsigned kind column.
func deriveFacts(idx uint64, body []byte) (any, error) {
	kind, ok := bodyKind(body)
	if !ok {
		var env struct {
			Kind Kind `json:"kind"`
		}
		if err := json.Unmarshal(body, &env); err != nil {
			return nil, fmt.Errorf("journal: entry %d: %w", idx, err)
		}
		kind = env.Kind
	}
	var rec any
	switch kind {
	case KindJoinToken:
		rec = &JoinTokenCreated{}
	case KindRevocation:
		rec = &Revocation{}
	case KindIssuance:
		// Most issuances are renewals and Kubernetes issuances: skip them
		// without decoding. In canonical JSON this exact text can only be
		// the method field itself, since quotes inside strings are escaped.
		// Nor a join-token issuance without an enrolment (omitted when
		// empty), which deriveFacts would drop after decoding it.
		if !bytes.Contains(body, []byte(`"method":"join-token"`)) || !bytes.Contains(body, []byte(`"enrolment_id":`)) {
			return nil, nil
		}
		rec = &Issuance{}
	default:
		return nil, nil
	}
	if _, err := (Entry{Index: idx, Kind: kind, Body: body}).decodeInto(rec); err != nil {
		return nil, err
	}
	if iss, ok := rec.(*Issuance); ok && (iss.Method != "join-token" || iss.EnrolmentID == "") {
		return nil, nil
	}
	return rec, nil
}

// bodyKind reads the kind from the start of a body as encode writes it.
func bodyKind(body []byte) (Kind, bool) {
	const prefix = `{"kind":"`
	if !bytes.HasPrefix(body, []byte(prefix)) {
		return "", false
	}
	rest := body[len(prefix):]
	end := bytes.IndexByte(rest, '"')
	if end < 0 || bytes.IndexByte(rest[:end], '\\') >= 0 {
		return "", false
	}
	return Kind(rest[:end]), true
}

// The lookups below see entries below bound: published ones for callers,
// every added one for the committer's preconditions.

// token returns the join token with the given hash.
func (l *ledger) token(hash []byte, bound uint64) (tokenState, bool) {
	id, ok := l.byHash[hex.EncodeToString(hash)]
	if !ok {
		return tokenState{}, false
	}
	return l.tokenByID(id, bound)
}

func (l *ledger) tokenByID(id string, bound uint64) (tokenState, bool) {
	t, ok := l.tokens[id]
	if !ok || t.created >= bound {
		return tokenState{}, false
	}
	s := *t
	if s.redeemed && s.redemption >= bound {
		s.redeemed, s.redemption, s.enrolledAt = false, 0, time.Time{}
	}
	return s, true
}

// revokedAfter returns the first revocation of id after entry idx and below
// bound.
func (l *ledger) revokedAfter(id string, idx, bound uint64) (revocationAt, bool) {
	rs := l.revocations[id]
	i := sort.Search(len(rs), func(i int) bool { return rs[i].idx > idx })
	if i < len(rs) && rs[i].idx < bound {
		return rs[i], true
	}
	return revocationAt{}, false
}
