package authority_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// TestLoadFilesNamesTheBadKey: a self-managed generation whose CA key or
// root key is empty, truncated, garbage or another key's is refused when it
// loads, naming the file, rather than at the next rotation (root key).
func TestLoadFilesNamesTheBadKey(t *testing.T) {
	now := time.Now()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	good, err := authority.NewSelfManagedFiles(td, now, authority.Lifetimes{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := authority.LoadFiles(context.Background(), good, "", now); err != nil {
		t.Fatalf("good files: %v", err)
	}
	cases := []struct {
		name, file string
		data       func() []byte
		want       string
	}{
		{"ca key empty", authority.CAKeyFile, func() []byte { return []byte{} }, "ca-key.pem is empty"},
		{"ca key truncated", authority.CAKeyFile, func() []byte { return good[authority.CAKeyFile][:60] }, "ca-key.pem (60 bytes) is not a usable key"},
		{"root key empty", authority.RootKeyFile, func() []byte { return []byte{} }, "root-key.pem is empty"},
		{"root key garbage", authority.RootKeyFile, func() []byte { return []byte("garbage") }, "root-key.pem (7 bytes) is not a usable key"},
		{"root key is the CA key", authority.RootKeyFile, func() []byte { return good[authority.CAKeyFile] }, "root-key.pem is the key of none of the roots"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string][]byte{}
			for k, v := range good {
				files[k] = v
			}
			files[tc.file] = tc.data()
			_, err := authority.LoadFiles(context.Background(), files, "", now)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadFiles = %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// TestLoadFilesRefusesAMintedCAWithoutItsRootKey: a generation trustmesh
// minted (it holds its own ca-key.pem) whose root-key.pem has gone is
// refused, naming the file, instead of loading as operator-supplied
// material that then never rotates; operator-supplied material, whose key
// is referenced (ca-key-uri) and which has no root key, still loads.
func TestLoadFilesRefusesAMintedCAWithoutItsRootKey(t *testing.T) {
	now := time.Now()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	minted, err := authority.NewSelfManagedFiles(td, now, authority.Lifetimes{})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := authority.SelfManaged(minted); !ok || err != nil {
		t.Fatalf("SelfManaged(minted) = %v, %v; want true", ok, err)
	}
	delete(minted, authority.RootKeyFile)
	_, err = authority.LoadFiles(context.Background(), minted, "", now)
	if !errors.Is(err, authority.ErrRootKeyMissing) || !strings.Contains(err.Error(), "root-key.pem") {
		t.Fatalf("LoadFiles without root-key.pem = %v, want ErrRootKeyMissing naming root-key.pem", err)
	}
	if _, err := authority.SelfManaged(minted); !errors.Is(err, authority.ErrRootKeyMissing) {
		t.Fatalf("SelfManaged without root-key.pem = %v, want ErrRootKeyMissing", err)
	}

	files, err := authority.ReadCACerts(operatorCA(t, nil), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := authority.LoadFiles(context.Background(), files, "", t0); err != nil {
		t.Fatalf("operator-supplied material: %v", err)
	}
	if ok, err := authority.SelfManaged(files); ok || err != nil {
		t.Fatalf("SelfManaged(operator-supplied) = %v, %v; want false, nil", ok, err)
	}
}
