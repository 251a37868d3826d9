package journal_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// fill appends n issuances one at a time, so that each gets a checkpoint,
// and returns the signed checkpoint of the full log.
func fill(t *testing.T, s *journal.Store, n int) []byte {
	t.Helper()
	for i := range n {
		iss := issuance(fmt.Sprintf("%x", 0x100+i), fmt.Sprintf("spiffe://cluster.local/ns/default/sa/w%d", i))
		if _, err := s.RecordIssuance(context.Background(), iss, nil); err != nil {
			t.Fatal(err)
		}
	}
	cps, err := s.Checkpoints(context.Background())
	if err != nil || len(cps) != n {
		t.Fatalf("%d checkpoints, %v; want one per append", len(cps), err)
	}
	return cps[len(cps)-1].Note
}

func verify(t *testing.T, b backend, witness ...[]byte) *journal.Report {
	t.Helper()
	s, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rep, err := journal.Verify(context.Background(), s, testVKey, witness)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func exec(t *testing.T, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// Every way of rewriting the stored log is found by verification, and
// points at where it happened.
func TestTamperIsDetected(t *testing.T) {
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	forger, _, _ := journal.NewCheckpointSigner("trustmesh.journal/test", otherKey)
	cases := []struct {
		name     string
		tamper   func(t *testing.T, db *sql.DB)
		witness  bool
		wantKind string
		wantAt   uint64 // an index inside the finding's range
	}{
		{"a changed body", func(t *testing.T, db *sql.DB) {
			exec(t, db, `UPDATE entries SET body = $1 WHERE idx = 5`, editBody(t, db, 5, "sa/w5", "sa/admin"))
		}, false, "altered-entry", 5},
		{"a changed body with its leaf hash recomputed", func(t *testing.T, db *sql.DB) {
			body := editBody(t, db, 5, "sa/w5", "sa/admin")
			exec(t, db, `UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 5`, body, leafHash(body))
		}, false, "checkpoint-mismatch", 5},
		{"a deleted row", func(t *testing.T, db *sql.DB) {
			exec(t, db, `DELETE FROM entries WHERE idx = 7`)
		}, false, "missing-entry", 7},
		{"an inserted row", func(t *testing.T, db *sql.DB) {
			exec(t, db, `UPDATE entries SET idx = idx + 1000 WHERE idx >= 10`)
			exec(t, db, `UPDATE entries SET idx = idx - 999 WHERE idx >= 1000`)
			body := []byte(`{"kind":"issuance","record":{"serial":"beef","spiffe_id":"spiffe://cluster.local/ns/default/sa/admin"}}`)
			exec(t, db, `INSERT INTO entries (idx, kind, time_ns, spiffe_id, serial, body, leaf_hash) VALUES (10, 'issuance', 0, '', 'beef', $1, $2)`,
				body, leafHash(body))
		}, false, "checkpoint-mismatch", 10},
		{"two rows swapped", func(t *testing.T, db *sql.DB) {
			exec(t, db, `UPDATE entries SET idx = 1003 WHERE idx = 3`)
			exec(t, db, `UPDATE entries SET idx = 3 WHERE idx = 4`)
			exec(t, db, `UPDATE entries SET idx = 4 WHERE idx = 1003`)
		}, false, "checkpoint-mismatch", 3},
		{"rows and checkpoints cut off after a witnessed checkpoint", func(t *testing.T, db *sql.DB) {
			exec(t, db, `DELETE FROM entries WHERE idx >= 15`)
			exec(t, db, `DELETE FROM checkpoints WHERE size > 15`)
		}, true, "truncated", 15},
		{"a forged checkpoint", func(t *testing.T, db *sql.DB) {
			forged, err := forgeNote(forger, 20)
			if err != nil {
				t.Fatal(err)
			}
			exec(t, db, `UPDATE checkpoints SET note = $1 WHERE size = 20`, forged)
		}, false, "forged-checkpoint", 20},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eachBackend(t, func(t *testing.T, b backend) {
				s := b.open(t)
				witnessed := fill(t, s, 20)
				if rep := verify(t, b, witnessed); !rep.OK() {
					t.Fatalf("an untouched log has findings: %+v", rep.Findings)
				}
				s.Close()
				tc.tamper(t, b.raw(t))
				var w [][]byte
				if tc.witness {
					w = append(w, witnessed)
				}
				rep := verify(t, b, w...)
				for _, f := range rep.Findings {
					if f.Kind == tc.wantKind && f.From <= tc.wantAt && tc.wantAt <= f.To {
						return
					}
				}
				t.Fatalf("findings %+v; want %s around entry %d", rep.Findings, tc.wantKind, tc.wantAt)
			})
		})
	}
}

// A journal whose log no longer matches its checkpoint refuses appends, so
// that no new checkpoint ever vouches for altered history.
func TestTamperedJournalRefusesAppends(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		fill(t, s, 3)
		s.Close()
		db := b.raw(t)
		body := editBody(t, db, 1, "sa/w1", "sa/admin")
		exec(t, db, `UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 1`, body, leafHash(body))
		s2, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn, Signer: testSigner, VerifierKey: testVKey})
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close()
		if !errors.Is(s2.Integrity(), journal.ErrTampered) {
			t.Fatalf("Integrity() = %v, want ErrTampered", s2.Integrity())
		}
		if _, err := s2.RecordIssuance(context.Background(), issuance("ff", "spiffe://cluster.local/x"), nil); !errors.Is(err, journal.ErrTampered) {
			t.Fatalf("RecordIssuance() on a tampered journal = %v, want ErrTampered", err)
		}
	})
}

// An inclusion proof checks out with the public key alone, and a doctored
// one does not.
func TestInclusionProof(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		fill(t, s, 13)
		for _, serial := range []string{"100", "106", "10c"} {
			p, err := journal.Prove(context.Background(), s, serial)
			if err != nil {
				t.Fatal(err)
			}
			entry, err := journal.CheckProof(p, testVKey)
			if err != nil {
				t.Fatalf("proof of %s: %v", serial, err)
			}
			if !strings.Contains(string(entry), `"serial":"`+serial+`"`) {
				t.Fatalf("proved entry %s is not the issuance of %s", entry, serial)
			}
			bad := *p
			bad.Entry = base64.StdEncoding.EncodeToString([]byte(strings.Replace(string(entry), "sa/w", "sa/x", 1)))
			if _, err := journal.CheckProof(&bad, testVKey); err == nil {
				t.Fatal("a proof of a changed entry checked out")
			}
		}
	})
}

// Two replicas appending to one PostgreSQL journal at once produce one
// consistent log.
func TestReplicasShareOneLog(t *testing.T) {
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("needs PostgreSQL")
	}
	b := bs[1]
	a, c := b.open(t), b.open(t)
	var wg sync.WaitGroup
	for r, s := range []*journal.Store{a, c} {
		for i := range 25 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				iss := issuance(fmt.Sprintf("%d-%d", r, i), "spiffe://cluster.local/x")
				if _, err := s.RecordIssuance(context.Background(), iss, nil); err != nil {
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	rep := verify(t, b)
	if !rep.OK() || rep.Entries != 50 {
		t.Fatalf("entries %d, findings %+v; want 50 and none", rep.Entries, rep.Findings)
	}
}

func leafHash(body []byte) []byte { return rfc6962.DefaultHasher.HashLeaf(body) }

// forgeNote signs a checkpoint at size with a key that is not the journal's.
func forgeNote(s note.Signer, size uint64) ([]byte, error) {
	return note.Sign(&note.Note{Text: journal.Checkpoint{Origin: s.Name(), Size: size, Root: make([]byte, 32)}.Text()}, s)
}

// editBody returns the body of entry idx with old replaced by new.
func editBody(t *testing.T, db *sql.DB, idx int, old, new string) []byte {
	t.Helper()
	var body []byte
	if err := db.QueryRow(`SELECT body FROM entries WHERE idx = $1`, idx).Scan(&body); err != nil {
		t.Fatal(err)
	}
	return []byte(strings.Replace(string(body), old, new, 1))
}

// Rewriting an entry and the unsigned root column beside the latest
// checkpoint does not fool the journal: it checks the signed note.
func TestRewrittenRootColumnIsCaught(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		fill(t, s, 5)
		s.Close()
		db := b.raw(t)
		body := editBody(t, db, 2, "sa/w2", "sa/admin")
		exec(t, db, `UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 2`, body, leafHash(body))
		var leaves [][]byte
		rows, err := db.Query(`SELECT leaf_hash FROM entries ORDER BY idx`)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var h []byte
			rows.Scan(&h)
			leaves = append(leaves, h)
		}
		rows.Close()
		exec(t, db, `UPDATE checkpoints SET root = $1 WHERE size = 5`, rootOf(t, leaves))
		s2 := b.open(t)
		if !errors.Is(s2.Integrity(), journal.ErrTampered) {
			t.Fatalf("Integrity() = %v, want ErrTampered", s2.Integrity())
		}
		if _, err := s2.RecordIssuance(context.Background(), issuance("ff", "spiffe://cluster.local/x"), nil); !errors.Is(err, journal.ErrTampered) {
			t.Fatalf("append after a rewrite = %v, want ErrTampered", err)
		}
	})
}

// A row slipped in behind a running journal is never signed into the log:
// the next append refuses, and stays refused.
func TestRowInsertedBehindTheJournalIsRefused(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		fill(t, s, 3)
		body := []byte(`{"kind":"issuance","record":{"serial":"beef","spiffe_id":"spiffe://cluster.local/ns/kube-system/sa/admin"}}`)
		exec(t, b.raw(t), `INSERT INTO entries (idx, kind, time_ns, spiffe_id, serial, body, leaf_hash) VALUES (3, 'issuance', 0, '', 'beef', $1, $2)`,
			body, leafHash(body))
		for range 2 {
			if _, err := s.RecordIssuance(context.Background(), issuance("ff", "spiffe://cluster.local/x"), nil); !errors.Is(err, journal.ErrTampered) {
				t.Fatalf("append after an insertion = %v, want ErrTampered", err)
			}
		}
		if rep := verify(t, b); rep.OK() {
			t.Fatal("verify found nothing")
		}
	})
}

func rootOf(t *testing.T, leaves [][]byte) []byte {
	t.Helper()
	f := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	r := f.NewEmptyRange(0)
	for _, l := range leaves {
		if err := r.Append(l, nil); err != nil {
			t.Fatal(err)
		}
	}
	root, err := r.GetRootHash(nil)
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// enrolled creates a join token for id, redeems it and revokes id, so that
// the journal holds an enrolment that must stay revoked. It returns the
// token's hash and the serial of its issuance.
func enrolled(t *testing.T, s *journal.Store, id string) (hash []byte, serial string) {
	t.Helper()
	ctx := context.Background()
	hash = leafHash([]byte(id)) // any 32 bytes
	if err := s.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "tok-" + id[len(id)-2:], SPIFFEID: id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	iss := issuance("e"+id[len(id)-2:], id)
	iss.EnrolmentID = "tok-" + id[len(id)-2:]
	if _, err := s.RecordIssuance(ctx, iss, &journal.Redemption{TokenHash: hash, TokenID: iss.EnrolmentID}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(ctx, id, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	return hash, iss.Serial
}

// Rows that lookups rest on are proven against the signed log, in a running
// journal: a rewrite of an old row never counts, and a rewrite that a
// lookup or a recheck reads fails the journal closed.
func TestRunningJournalTrustsNoRewrittenRow(t *testing.T) {
	const victim = "spiffe://cluster.local/vm/v1"
	cases := []struct {
		name string
		// rewrite alters the log behind the running journal.
		rewrite func(t *testing.T, db *sql.DB, serial string)
		// lookup is what a request would then read; it must not succeed
		// with what the rewrite says.
		lookup func(t *testing.T, s *journal.Store, hash []byte, serial string) error
		// tampered: the lookup itself finds the rewrite.
		tampered bool
	}{
		{"an issuance rewritten to another identity", func(t *testing.T, db *sql.DB, serial string) {
			body := editBody(t, db, 5, "sa/w5", "sa/admin")
			exec(t, db, `UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 5`, body, leafHash(body))
		}, func(t *testing.T, s *journal.Store, _ []byte, _ string) error {
			iss, err := s.LookupIssuance(context.Background(), "105")
			if err == nil {
				t.Errorf("renewal lookup returned %s from a rewritten row", iss.SPIFFEID)
			}
			return err
		}, true},
		{"an old row rewritten into a join token's creation", func(t *testing.T, db *sql.DB, _ string) {
			body := []byte(`{"kind":"join-token","record":{"time":"2026-11-23T12:00:00Z","token_id":"f00d","token_sha256":"` +
				fmt.Sprintf("%x", leafHash([]byte("forged"))) + `","spiffe_id":"spiffe://cluster.local/ns/kube-system/sa/admin","expires_at":"2099-01-01T00:00:00Z"}}`)
			exec(t, db, `UPDATE entries SET kind = 'join-token', serial = 'f00d', body = $1, leaf_hash = $2 WHERE idx = 2`, body, leafHash(body))
		}, func(t *testing.T, s *journal.Store, _ []byte, _ string) error {
			if tok, err := s.LookupJoinToken(context.Background(), leafHash([]byte("forged"))); !errors.Is(err, journal.ErrNotFound) {
				t.Errorf("forged token lookup = %+v, %v; want ErrNotFound", tok, err)
			}
			_, err := s.LookupJoinTokenCreation(context.Background(), "f00d")
			return err
		}, true},
		{"the revocation rewritten into a refusal", func(t *testing.T, db *sql.DB, _ string) {
			body := []byte(`{"kind":"refusal","record":{"reason":"x","count":1}}`)
			exec(t, db, `UPDATE entries SET kind = 'refusal', body = $1, leaf_hash = $2 WHERE kind = 'revocation'`, body, leafHash(body))
		}, func(t *testing.T, s *journal.Store, _ []byte, _ string) error {
			e, err := s.LookupEnrolment(context.Background(), "tok-v1")
			if err == nil && e.RevokedAt.IsZero() {
				t.Error("a rewritten revocation row cleared the revocation")
			}
			return err
		}, false},
		{"the revocation deleted", func(t *testing.T, db *sql.DB, _ string) {
			exec(t, db, `DELETE FROM entries WHERE kind = 'revocation'`)
		}, func(t *testing.T, s *journal.Store, hash []byte, _ string) error {
			e, err := s.LookupEnrolment(context.Background(), "tok-v1")
			if err == nil && e.RevokedAt.IsZero() {
				t.Error("a deleted revocation row cleared the revocation")
			}
			return err
		}, true}, // it was the last row: the log shrank
		{"the enrolment's issuance made younger", func(t *testing.T, db *sql.DB, serial string) {
			var body []byte
			if err := db.QueryRow(`SELECT body FROM entries WHERE serial = $1`, serial).Scan(&body); err != nil {
				t.Fatal(err)
			}
			body = []byte(strings.ReplaceAll(string(body), "2026-11-23", "2099-11-23"))
			exec(t, db, `UPDATE entries SET body = $1, leaf_hash = $2 WHERE serial = $3`, body, leafHash(body), serial)
		}, func(t *testing.T, s *journal.Store, _ []byte, _ string) error {
			e, err := s.LookupEnrolment(context.Background(), "tok-v1")
			if err == nil && !e.EnrolledAt.Equal(t0) {
				t.Errorf("enrolment dated %s after a rewrite, want %s", e.EnrolledAt, t0)
			}
			return err
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eachBackend(t, func(t *testing.T, b backend) {
				ctx := context.Background()
				s := b.open(t)
				fill(t, s, 8)
				hash, serial := enrolled(t, s, victim)
				tc.rewrite(t, b.raw(t), serial)

				err := tc.lookup(t, s, hash, serial)
				if tc.tampered != errors.Is(err, journal.ErrTampered) {
					t.Fatalf("lookup = %v; want ErrTampered: %v", err, tc.tampered)
				}
				// Whether or not a lookup read the row, a recheck finds it,
				// and then the journal refuses every append and lookup.
				if err := s.Recheck(ctx); !errors.Is(err, journal.ErrTampered) {
					t.Fatalf("Recheck() = %v, want ErrTampered", err)
				}
				if !errors.Is(s.Integrity(), journal.ErrTampered) {
					t.Fatalf("Integrity() = %v, want ErrTampered", s.Integrity())
				}
				if _, err := s.RecordIssuance(ctx, issuance("ff", "spiffe://cluster.local/x"), nil); !errors.Is(err, journal.ErrTampered) {
					t.Fatalf("append after a rewrite = %v, want ErrTampered", err)
				}
				if _, err := s.LookupIssuance(ctx, "100"); !errors.Is(err, journal.ErrTampered) {
					t.Fatalf("lookup after a rewrite = %v, want ErrTampered", err)
				}
			})
		})
	}
}

// A running journal rechecks its whole log on its own, on the clock.
func TestWatchFindsARewrite(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		clk := clocktesting.NewFakeClock(t0)
		s, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn, Signer: testSigner, VerifierKey: testVKey,
			Clock: clk, RecheckInterval: time.Minute, CommitDelay: -1})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		fill(t, s, 4)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Watch(ctx) }()
		defer func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Watch() = %v", err)
			}
		}()
		step := func() {
			t.Helper()
			deadline := time.Now().Add(10 * time.Second)
			for !clk.HasWaiters() {
				if time.Now().After(deadline) {
					t.Fatal("Watch never waited on the clock")
				}
				time.Sleep(time.Millisecond)
			}
			clk.Step(time.Minute)
		}
		step()
		step() // the first recheck has run over an intact log
		if err := s.Integrity(); err != nil {
			t.Fatalf("Integrity() = %v over an intact log", err)
		}
		body := editBody(t, b.raw(t), 1, "sa/w1", "sa/admin")
		exec(t, b.raw(t), `UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 1`, body, leafHash(body))
		step()
		step()
		if !errors.Is(s.Integrity(), journal.ErrTampered) {
			t.Fatalf("Integrity() = %v after a rewrite and a recheck, want ErrTampered", s.Integrity())
		}
	})
}

// A replica that has been appending sees what another writer appended
// since when it looks it up: a join token created elsewhere, and an
// issuance. The lookup's catch-up must read the log, whichever way the
// replica's own commits went.
func TestLookupSeesAnotherWritersAppends(t *testing.T) {
	eachBackend(t, testLookupSeesAnotherWritersAppends)
}

func testLookupSeesAnotherWritersAppends(t *testing.T, b backend) {
	ctx := context.Background()
	a, c := b.open(t), b.open(t)
	if _, err := a.RecordIssuance(ctx, renewal("a-1", "spiffe://cluster.local/a"), nil); err != nil {
		t.Fatal(err)
	}
	hash := []byte("0123456789abcdef0123456789abcdef")
	if err := c.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "tok-c", SPIFFEID: "spiffe://cluster.local/vm/c",
		CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RecordIssuance(ctx, renewal("c-1", "spiffe://cluster.local/c"), nil); err != nil {
		t.Fatal(err)
	}
	if tok, err := a.LookupJoinToken(ctx, hash); err != nil || tok.ID != "tok-c" {
		t.Fatalf("a looks up the token c created: %+v, %v", tok, err)
	}
	if iss, err := a.LookupIssuance(ctx, "c-1"); err != nil || iss.Serial != "c-1" {
		t.Fatalf("a looks up c's issuance: %+v, %v", iss, err)
	}
	if _, err := a.RecordIssuance(ctx, renewal("a-2", "spiffe://cluster.local/a"), nil); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, b); !rep.OK() || rep.Entries != 4 {
		t.Fatalf("entries %d, findings %+v; want 4 and none", rep.Entries, rep.Findings)
	}
}
