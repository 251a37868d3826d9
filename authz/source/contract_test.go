package source_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/sourcetest"
)

// dirStore is a policy directory: one file per document, each written
// atomically, as a careful operator (or a ConfigMap mount) does.
type dirStore struct{ dir *source.Dir }

func (d dirStore) Source() source.PolicySource { return d.dir }
func (d dirStore) Namespace() string           { return d.dir.DefaultNamespace }

func (d dirStore) Put(t *testing.T, docs map[string]string) {
	t.Helper()
	entries, err := os.ReadDir(d.dir.Path)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		name := strings.TrimSuffix(e.Name(), ".yaml")
		if _, keep := docs[name]; !keep {
			if err := os.Remove(filepath.Join(d.dir.Path, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, doc := range docs {
		path := filepath.Join(d.dir.Path, name+".yaml")
		if old, err := os.ReadFile(path); err == nil && string(old) == doc {
			continue
		}
		tmp := filepath.Join(d.dir.Path, "."+name+".tmp")
		if err := os.WriteFile(tmp, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
}

func TestDirContract(t *testing.T) {
	sourcetest.Run(t, func(t *testing.T) sourcetest.Store {
		return dirStore{dir: &source.Dir{Path: t.TempDir(), DefaultNamespace: "shop"}}
	})
}
