package controlplane_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/transparency-dev/merkle/rfc6962"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/controlplane"
)

var adminID = spiffeid.RequireFromString("spiffe://cluster.local/ns/kube-system/sa/admin")

// journalBackend is where a running control plane keeps its journal.
type journalBackend struct {
	name   string
	mutate func(t *testing.T, c *controlplane.Config)
}

// journalBackends are the data directory's SQLite file and, when the test
// script started one, a shared PostgreSQL database: the threat lives where
// the database is shared.
func journalBackends(t *testing.T) []journalBackend {
	out := []journalBackend{{name: "sqlite", mutate: func(*testing.T, *controlplane.Config) {}}}
	admin := os.Getenv("TRUSTMESH_TEST_POSTGRES_DSN")
	if admin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("TRUSTMESH_TEST_POSTGRES_DSN is not set: make test starts PostgreSQL and sets it")
		}
		t.Log("TRUSTMESH_TEST_POSTGRES_DSN is not set; skipping the PostgreSQL back end")
		return out
	}
	return append(out, journalBackend{name: "postgres", mutate: func(t *testing.T, c *controlplane.Config) {
		c.Journal.DSN = dsnWithDatabase(t, admin)
		c.CA.CertsDir = operatorCA(t, time.Now())
		c.Journal.CheckpointKeyURI = checkpointKey(t)
	}})
}

// checkpointKey writes an Ed25519 checkpoint key, as an operator sharing a
// journal between replicas would keep in a KMS, and returns its URI.
func checkpointKey(t *testing.T) string {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "checkpoint-key.pem")
	if err := authority.WriteKeyFile(path, key); err != nil {
		t.Fatal(err)
	}
	uri, err := authority.SoftKMSURI(path)
	if err != nil {
		t.Fatal(err)
	}
	return uri
}

// rawJournal opens the journal's database behind the CA's back, as whoever
// can write it (and holds no key) would.
func (e *env) rawJournal(t *testing.T) *sql.DB {
	t.Helper()
	if e.jo.DSN != "" {
		return openPostgres(t, e.jo.DSN)
	}
	db, err := sql.Open("sqlite", "file:"+admin.DataDir(e.dataDir).JournalPath())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func mustExec(t *testing.T, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// forgeJoinToken is the attack: rewrite the old journal row idx into the
// creation of a join token for id, with its leaf hash recomputed, and add
// the matching token row (creating the table as older versions had it).
// It returns the token.
func forgeJoinToken(t *testing.T, db *sql.DB, idx int, id spiffeid.ID, now time.Time) string {
	t.Helper()
	token := "tmjt.forged-by-whoever-owns-the-database-" + randHex(8)
	hash := sha256.Sum256([]byte(token))
	tokenID := hex.EncodeToString(hash[:8])
	body, err := json.Marshal(map[string]any{"kind": journal.KindJoinToken, "record": map[string]any{
		"time": now.UTC(), "token_id": tokenID, "token_sha256": hex.EncodeToString(hash[:]),
		"spiffe_id": id.String(), "expires_at": now.Add(time.Hour).UTC(),
	}})
	if err != nil {
		t.Fatal(err)
	}
	mustExec(t, db, `UPDATE entries SET kind = $1, spiffe_id = $2, serial = $3, body = $4, leaf_hash = $5 WHERE idx = $6`,
		string(journal.KindJoinToken), id.String(), tokenID, body, rfc6962.DefaultHasher.HashLeaf(body), idx)
	mustExec(t, db, `CREATE TABLE IF NOT EXISTS join_tokens (token_hash BYTEA PRIMARY KEY, token_id TEXT NOT NULL UNIQUE,
		spiffe_id TEXT NOT NULL, created_ns BIGINT NOT NULL, expires_ns BIGINT NOT NULL, used_ns BIGINT, revoked_ns BIGINT)`)
	mustExec(t, db, `INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_ns, expires_ns) VALUES ($1, $2, $3, $4, $5)`,
		hash[:], tokenID, id.String(), now.UnixNano(), now.Add(time.Hour).UnixNano())
	return token
}

// readyz returns the status of the monitoring port's /readyz.
func (e *env) readyz() int {
	e.t.Helper()
	resp, err := http.Get("http://" + e.cp.Addrs().Monitoring.String() + "/readyz")
	if err != nil {
		e.t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitReady waits for the control plane to report ready.
func (e *env) waitReady() {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.readyz() != http.StatusOK {
		if time.Now().After(deadline) {
			e.t.Fatal("the control plane never became ready")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A writer of the journal's database who holds no key rewrites an old row
// into the creation of a join token for kube-system/sa/admin and adds the
// token: the running CA must not issue that identity, must notice the
// rewrite, must stop issuing and signing, and must say so on /readyz.
func TestRewrittenJournalRowMintsNoIdentity(t *testing.T) {
	for _, b := range journalBackends(t) {
		t.Run(b.name, func(t *testing.T) {
			var keyURI string
			e := start(t, func(c *controlplane.Config) { b.mutate(t, c); keyURI = c.Journal.CheckpointKeyURI })
			e.jo.CheckpointKeyURI = keyURI
			e.waitReady()
			ctx := context.Background()
			vm := newClient(t)
			e.obtain(vm, e.token(vmID, 10*time.Minute), vmID)
			size, err := e.cp.Journal().Size(ctx)
			if err != nil || size < 3 {
				t.Fatalf("journal size %d, %v; want some history to rewrite", size, err)
			}

			token := forgeJoinToken(t, e.rawJournal(t), 1, adminID, e.clock.Now())
			_, err = request(ctx, e.dial(nil, "localhost"), token, newClient(t).csr(t, ""), time.Hour)
			if err == nil {
				t.Fatalf("the CA issued %s on a join token forged in its database", adminID)
			}
			if c := status.Code(err); c != codes.Unauthenticated && c != codes.Unavailable {
				t.Fatalf("forged join token: %v; want Unauthenticated or Unavailable", err)
			}

			// The CA noticed: it is not ready, and it issues nothing more,
			// not even a renewal that would have succeeded before.
			if got := e.readyz(); got != http.StatusServiceUnavailable {
				t.Fatalf("/readyz = %d after the rewrite, want 503", got)
			}
			if _, err := request(ctx, e.dial(vm, "localhost"), "", vm.csr(t, ""), time.Hour); err == nil {
				t.Fatal("the CA renewed a certificate over a rewritten journal")
			}
			after, err := e.cp.Journal().Size(ctx)
			if err != nil || after != size {
				t.Fatalf("journal size %d, %v after the rewrite; want %d: nothing appended or signed", after, err, size)
			}
		})
	}
}
