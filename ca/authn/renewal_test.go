package authn_test

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// A client chain that verified once is not verified again on every renewal
// of a kept connection, but what it was verified against still decides: once
// its root leaves the bundle, or once a certificate of it expires, the same
// chain is refused as it would be on its first use.
func TestRenewalRechecksARememberedChain(t *testing.T) {
	f := newCAFixture(t)
	ctx := context.Background()
	chain := f.enrol(t, workload)
	// Enrolments outlive the certificate here, so that only the chain's
	// own validity can refuse it at the end.
	r := &authn.Renewal{TrustDomain: td, Bundle: f.auth, Store: f.store, MaxEnrolmentAge: 24 * time.Hour, Clock: f.clock}
	for range 2 {
		if _, err := r.Authenticate(ctx, chain); err != nil {
			t.Fatal(err)
		}
	}
	old := f.auth.Current()
	next, err := authority.Generate(ctx, td, f.clock.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	f.auth.Replace(next)
	_, err = r.Authenticate(ctx, chain)
	refusedFor(t, err, ca.ReasonCertInvalid)

	f.auth.Replace(old)
	if _, err := r.Authenticate(ctx, chain); err != nil {
		t.Fatalf("back under its root: %v", err)
	}
	f.clock.SetTime(chain[0].NotAfter.Add(time.Second))
	_, err = r.Authenticate(ctx, chain)
	refusedFor(t, err, ca.ReasonCertInvalid)
}

// A renewal remembers the client chain it verified and the journal's record
// of the certificate, but not the enrolment behind it: an enrolment revoked
// by another replica of the CA, writing to the same journal, refuses the
// very next renewal of a remembered chain. Run on SQLite, and on
// PostgreSQL when the test script provides one.
func TestRenewalSeesAnotherReplicasRevocation(t *testing.T) {
	dsns := map[string]string{"sqlite": filepath.Join(t.TempDir(), "journal.db")}
	if admin := os.Getenv("TRUSTMESH_TEST_POSTGRES_DSN"); admin != "" {
		dsns["postgres"] = freshPostgresDatabase(t, admin)
	} else if os.Getenv("CI") != "" {
		t.Fatal("TRUSTMESH_TEST_POSTGRES_DSN is not set: make test starts PostgreSQL and sets it")
	}
	for name, dsn := range dsns {
		t.Run(name, func(t *testing.T) {
			f := newCAFixtureOn(t, dsn)
			ctx := context.Background()
			chain := f.enrol(t, workload)
			for range 3 {
				if _, err := f.renewal.Authenticate(ctx, chain); err != nil {
					t.Fatal(err)
				}
			}
			other, err := journal.Open(ctx, f.journal)
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			if _, err := other.Revoke(ctx, workload.String(), f.clock.Now()); err != nil {
				t.Fatal(err)
			}
			_, err = f.renewal.Authenticate(ctx, chain)
			refusedFor(t, err, ca.ReasonEnrolmentRevoked)
		})
	}
}

// freshPostgresDatabase creates a database of its own on the server admin
// names, dropped at the end of the test, and returns its DSN.
func freshPostgresDatabase(t *testing.T, admin string) string {
	t.Helper()
	db, err := sql.Open("pgx", admin)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	name := "authn_" + hex.EncodeToString(b)
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if db, err := sql.Open("pgx", admin); err == nil {
			db.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)")
			db.Close()
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}
