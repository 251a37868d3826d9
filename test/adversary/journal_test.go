package adversary

import (
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	_ "modernc.org/sqlite" // the journal's database, as its writer sees it
)

// TestJournalWriterMintsNoIdentity (class 3): a writer of the journal
// database, with no key, rewrites an old journal row into the creation of a
// join token for an admin identity (with the token's hash, and a matching
// leaf hash), and inserts the token's row where the database has a table
// of tokens. The CA must refuse the token and stop reporting ready.
func TestJournalWriterMintsNoIdentity(t *testing.T) {
	s := start(t, serveConfig{})
	// Some history to rewrite: an enrolment and a refusal.
	s.enrol(t, td+"/ns/journal/sa/app")
	if _, err := createCertificate(s.dialCA(t, nil), "tmjt.unknown", csrPEM(t, newKey(t), nil), time.Hour); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("an unknown token: %v, want Unauthenticated", err)
	}

	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	db, err := sql.Open("sqlite", "file:"+filepath.Join(s.dataDir, "journal.db")+"?"+q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var idx int64
	if err := db.QueryRow(`SELECT MIN(idx) FROM entries WHERE kind != 'join-token'`).Scan(&idx); err != nil {
		t.Fatal(err)
	}

	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	token := "tmjt." + base64.RawURLEncoding.EncodeToString(secret)
	hash := sha256.Sum256([]byte(token))
	tokenID := hex.EncodeToString(hash[:8])
	now := time.Now().UTC().Truncate(time.Second)
	expires := now.Add(time.Hour)
	body, err := json.Marshal(map[string]any{"kind": "join-token", "record": map[string]any{
		"time": now, "token_id": tokenID, "token_sha256": hex.EncodeToString(hash[:]), "spiffe_id": adminID, "expires_at": expires}})
	if err != nil {
		t.Fatal(err)
	}
	leaf := sha256.Sum256(append([]byte{0}, body...))
	if _, err := db.Exec(`UPDATE entries SET kind = 'join-token', spiffe_id = $1, serial = $2, body = $3, leaf_hash = $4 WHERE idx = $5`,
		adminID, tokenID, body, leaf[:], idx); err != nil {
		t.Fatal(err)
	}
	// Where the database keeps a table of tokens beside the log, the
	// token's row goes in too.
	var tables int
	if err := db.QueryRow(`SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'join_tokens'`).Scan(&tables); err != nil {
		t.Fatal(err)
	}
	if tables > 0 {
		if _, err := db.Exec(`INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_ns, expires_ns) VALUES ($1, $2, $3, $4, $5)`,
			hash[:], tokenID, adminID, now.UnixNano(), expires.UnixNano()); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("rewrote journal row %d into a join-token creation for %s", idx, adminID)

	resp, err := createCertificate(s.dialCA(t, nil), token, csrPEM(t, newKey(t), nil), time.Hour)
	if err == nil {
		t.Errorf("the forged token was honoured: issued %v", parseChain(t, resp)[0].URIs)
	} else {
		t.Logf("the forged token was refused: %s", status.Code(err))
	}
	// The CA notices the rewrite and says it is not ready.
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, err := s.get("/readyz")
		if err == nil && code != http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz still answers %d, %v after the journal was rewritten", code, err)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Nor does it issue to anyone else on top of the altered history.
	// (The operator's CLI may itself refuse to create the token.)
	if out, err := s.cli("ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", td+"/ns/journal/sa/later"); err == nil {
		if _, err := createCertificate(s.dialCA(t, nil), strings.TrimSpace(string(out)), csrPEM(t, newKey(t), nil), time.Hour); err == nil {
			t.Error("the CA still issues over a rewritten journal")
		}
	}
}
