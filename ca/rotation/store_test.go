package rotation_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

var apiserver kubeapi.Shared

// namespaces numbers the namespaces of the SecretStore tests, which share
// one apiserver however often they run.
var namespaces atomic.Int64

// TestMain stops the shared kube-apiserver and fails a passing run that
// leaves goroutines running (Run's loop among them).
func TestMain(m *testing.M) { apiserver.Main(m) }

// TestStores runs one contract suite against both Store implementations:
// a directory, and a Secret in a real kube-apiserver.
func TestStores(t *testing.T) {
	t.Run("DirStore", func(t *testing.T) {
		testStore(t, func(t *testing.T) rotation.Store { return rotation.DirStore{Dir: t.TempDir()} })
	})
	t.Run("SecretStore", func(t *testing.T) {
		client := kubernetes.NewForConfigOrDie(apiserver.Config(t))
		testStore(t, func(t *testing.T) rotation.Store {
			ns := fmt.Sprintf("rotation-%d", namespaces.Add(1))
			if _, err := client.CoreV1().Namespaces().Create(context.Background(),
				&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			return rotation.SecretStore{Client: client, Namespace: ns, Name: "trustmesh-ca"}
		})
	})
}

func state(active, next int) []byte {
	return []byte(fmt.Sprintf(`{"active": %d, "next": %d, "last_generation": %d}`, active, next, max(active, next)))
}

// snapshot is a state naming active (and next, unless 0) and the files of
// those generations, their content marked with tag.
func snapshot(version string, active, next int, tag string) rotation.Snapshot {
	s := rotation.Snapshot{Version: version, Files: map[string][]byte{"rotation.json": state(active, next)}}
	for _, g := range []int{active, next} {
		if g == 0 {
			continue
		}
		for _, f := range []string{"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "root-key.pem"} {
			s.Files[fmt.Sprintf("gen-%d/%s", g, f)] = []byte(fmt.Sprintf("%s gen-%d %s", tag, g, f))
		}
	}
	return s
}

// holds checks that got holds every file of want.
func holds(t *testing.T, got, want rotation.Snapshot) {
	t.Helper()
	for name, data := range want.Files {
		if !bytes.Equal(got.Files[name], data) {
			t.Fatalf("%s: read %q, wrote %q", name, got.Files[name], data)
		}
	}
}

func testStore(t *testing.T, newStore func(t *testing.T) rotation.Store) {
	ctx := context.Background()
	t.Run("empty", func(t *testing.T) {
		snap, err := newStore(t).Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.Files) != 0 || snap.Version != "" {
			t.Fatalf("an empty store read %d files at version %q", len(snap.Files), snap.Version)
		}
	})
	t.Run("create, then read back", func(t *testing.T) {
		s := newStore(t)
		want := snapshot("", 1, 0, "a")
		if err := s.Write(ctx, want); err != nil {
			t.Fatal(err)
		}
		got, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		holds(t, got, want)
		if got.Version == "" {
			t.Fatal("a written store reads at no version")
		}
	})
	t.Run("create exactly once", func(t *testing.T) {
		s := newStore(t)
		if err := s.Write(ctx, snapshot("", 1, 0, "a")); err != nil {
			t.Fatal(err)
		}
		if err := s.Write(ctx, snapshot("", 1, 0, "b")); !errors.Is(err, rotation.ErrConflict) {
			t.Fatalf("a second creation: %v, want ErrConflict", err)
		}
		got, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		holds(t, got, snapshot("", 1, 0, "a"))
	})
	t.Run("compare and swap", func(t *testing.T) {
		s := newStore(t)
		if err := s.Write(ctx, snapshot("", 1, 0, "a")); err != nil {
			t.Fatal(err)
		}
		v1, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Write(ctx, snapshot(v1.Version, 1, 2, "b")); err != nil {
			t.Fatalf("write at the version read: %v", err)
		}
		if err := s.Write(ctx, snapshot(v1.Version, 1, 2, "c")); !errors.Is(err, rotation.ErrConflict) {
			t.Fatalf("write at a stale version: %v, want ErrConflict", err)
		}
		v2, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		holds(t, v2, snapshot("", 1, 2, "b"))
		if v2.Version == v1.Version {
			t.Fatal("the version did not change with the content")
		}
	})
	t.Run("one winner among concurrent writers", func(t *testing.T) {
		// Writers that read the same version (serve and trustmesh ca rotate)
		// race to replace it: exactly one succeeds, the others conflict,
		// and the store holds the winner's files whole.
		s := newStore(t)
		if err := s.Write(ctx, snapshot("", 1, 0, "a")); err != nil {
			t.Fatal(err)
		}
		cur, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		const writers = 4
		errs := make(chan error, writers)
		for w := 0; w < writers; w++ {
			go func() { errs <- s.Write(ctx, snapshot(cur.Version, 1, 2, fmt.Sprint("w", w))) }()
		}
		won := 0
		for w := 0; w < writers; w++ {
			switch err := <-errs; {
			case err == nil:
				won++
			case !errors.Is(err, rotation.ErrConflict):
				t.Fatal(err)
			}
		}
		if won != 1 {
			t.Fatalf("%d of %d writers at one version succeeded, want exactly 1", won, writers)
		}
		got, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		tag := string(bytes.Fields(got.Files["gen-2/ca-cert.pem"])[0])
		holds(t, got, snapshot("", 1, 2, tag))
	})
	t.Run("the generations the state names", func(t *testing.T) {
		// Activating gen-2 and preparing gen-3: both are kept whole, beside
		// whatever the store keeps of gen-1.
		s := newStore(t)
		if err := s.Write(ctx, snapshot("", 1, 2, "a")); err != nil {
			t.Fatal(err)
		}
		cur, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		next := snapshot(cur.Version, 2, 3, "a")
		for name, data := range cur.Files {
			if _, ok := next.Files[name]; !ok {
				next.Files[name] = data
			}
		}
		if err := s.Write(ctx, next); err != nil {
			t.Fatal(err)
		}
		got, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		holds(t, got, snapshot("", 2, 3, "a"))
	})
	t.Run("a manager over it", func(t *testing.T) {
		// The first generation is created once however many replicas start
		// together; all of them then serve it.
		s := newStore(t)
		var certs [4][]byte
		errs := make(chan error, len(certs))
		for i := range certs {
			go func() {
				m, err := rotation.New(rotation.Config{Store: s, TrustDomain: td, Log: quiet})
				if err == nil {
					var st rotation.State
					if st, err = m.ReadState(ctx); err == nil && st.Active != 1 {
						err = fmt.Errorf("state %+v", st)
					}
					mat, _, merr := m.Certificates(ctx, t0)
					if err == nil && merr == nil {
						certs[i] = mat.Cert.Raw
					}
					err = errors.Join(err, merr)
				}
				errs <- err
			}()
		}
		for range certs {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		for i := range certs {
			if !bytes.Equal(certs[i], certs[0]) {
				t.Fatal("replicas starting together serve different CAs")
			}
		}
	})
}
