package admin_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/admin"
)

// newServedDir sets up a data directory as serve does: the journal, its
// checkpoint key and a CA, which has issued one certificate.
func newServedDir(t *testing.T) admin.DataDir {
	t.Helper()
	e := newCAEnv(t, 0)
	e.issue(spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), false)
	return e.dir
}

// TestServeRefusesToStartANewJournalUnderACA: serve's open of a data
// directory whose CA exists refuses a missing or empty journal.db, and a
// missing checkpoint key beside a journal with entries, instead of
// creating a new one; it creates nothing.
func TestServeRefusesToStartANewJournalUnderACA(t *testing.T) {
	for _, c := range []struct {
		name, file string
		corrupt    func(string) error
		want       string
	}{
		{"journal missing", "journal.db", os.Remove, "journal.db is missing, but this data directory already holds a CA"},
		{"journal empty", "journal.db", func(p string) error { return os.Truncate(p, 0) }, "journal.db is empty, but this data directory already holds a CA"},
		{"checkpoint key missing", "checkpoint-key.pem", os.Remove, "checkpoint-key.pem is missing, but the journal already holds"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := newServedDir(t)
			path := filepath.Join(string(dir), c.file)
			if err := c.corrupt(path); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Stat(path)
			store, _, err := dir.OpenJournal(context.Background(), "cluster.local", admin.JournalOptions{}, false)
			if err == nil {
				store.Close()
				t.Fatalf("OpenJournal with %s: no error", c.name)
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "restore") {
				t.Errorf("OpenJournal with %s: %v; want it to say %q and to restore", c.name, err, c.want)
			}
			after, _ := os.Stat(path)
			if (before == nil) != (after == nil) || (before != nil && before.Size() != after.Size()) {
				t.Errorf("OpenJournal with %s changed %s: before %v, after %v", c.name, c.file, before, after)
			}
		})
	}
}

// TestFirstStartStillCreatesTheJournal: an empty data directory opens, and
// gets a journal and a published checkpoint key.
func TestFirstStartStillCreatesTheJournal(t *testing.T) {
	dir := admin.DataDir(t.TempDir())
	store, _, err := dir.OpenJournal(context.Background(), "cluster.local", admin.JournalOptions{}, false)
	if err != nil {
		t.Fatalf("first start: %v", err)
	}
	store.Close()
	if _, err := os.Stat(dir.CheckpointPubPath()); err != nil {
		t.Errorf("first start published no checkpoint.pub: %v", err)
	}
}
