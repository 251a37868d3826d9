package rotation

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
	"github.com/trustmesh/trustmesh/internal/dirlock"
)

// ErrConflict is returned by a Store when the state changed since it was
// read; the caller reads again and retries.
var ErrConflict = errors.New("rotation: the CA state changed concurrently")

// Snapshot is the whole rotation state: the state file and the files of
// every generation, named "rotation.json" and "gen-N/<file>".
type Snapshot struct {
	Files map[string][]byte
	// Version identifies what was read, for compare-and-swap.
	Version string
}

// Store holds the CA material and its rotation state.
type Store interface {
	Read(ctx context.Context) (Snapshot, error)
	// Write replaces the state with s if it is still at s.Version.
	Write(ctx context.Context, s Snapshot) error
}

// DirStore keeps the state in a directory on one machine: each generation
// in a subdirectory, the state file replaced atomically after the
// generations it names are written.
type DirStore struct{ Dir string }

// Read implements Store.
func (d DirStore) Read(_ context.Context) (Snapshot, error) {
	s := Snapshot{Files: map[string][]byte{}}
	path := filepath.Join(d.Dir, stateFile)
	gens, err := filepath.Glob(filepath.Join(d.Dir, "gen-*"))
	if err != nil {
		return Snapshot{}, fmt.Errorf("rotation: %w", err)
	}
	state, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Stat(filepath.Join(d.Dir, creatingMarker)); err == nil {
			// The first write stopped before its state: nothing was
			// ever served from these generations, and the next write
			// replaces them.
			return s, nil
		}
		if len(gens) > 0 {
			// Generations are written before the state that names them,
			// but the first state is written with generation 1: a CA
			// directory with generations and no state lost its state.
			return Snapshot{}, fmt.Errorf("%w: %s is missing beside %d generation(s) of CA material in %s; %s",
				ErrCorruptState, path, len(gens), d.Dir, restoreHint)
		}
		return s, nil
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("rotation: %w", err)
	}
	if _, err := parseState(state); err != nil {
		return Snapshot{}, fmt.Errorf("%w (the file is %s)", err, path)
	}
	s.Files[stateFile] = state
	s.Version = digest(state)
	for _, g := range gens {
		entries, err := os.ReadDir(g)
		if err != nil {
			return Snapshot{}, fmt.Errorf("rotation: %w", err)
		}
		for _, e := range entries {
			if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(g, e.Name()))
			if err != nil {
				return Snapshot{}, fmt.Errorf("rotation: %w", err)
			}
			s.Files[filepath.Base(g)+"/"+e.Name()] = b
		}
	}
	return s, nil
}

// Write implements Store. Generations are written before the state file
// that names them, so a crash leaves the old state in force. The version
// check and the writes hold an exclusive lock on the directory's lock file,
// so that of two processes writing at one version (trustmesh ca rotate
// beside a running serve) one wins and the other gets ErrConflict.
func (d DirStore) Write(ctx context.Context, s Snapshot) error {
	if err := os.MkdirAll(d.Dir, 0o700); err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	unlock, err := lockDir(d.Dir)
	if err != nil {
		return err
	}
	defer unlock()
	cur, err := os.ReadFile(filepath.Join(d.Dir, stateFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if s.Version != "" {
			return ErrConflict
		}
		if err := writeAtomic(filepath.Join(d.Dir, creatingMarker), nil); err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("rotation: %w", err)
	case digest(cur) != s.Version:
		return ErrConflict
	}
	for name, data := range s.Files {
		if name == stateFile {
			continue
		}
		path := filepath.Join(d.Dir, filepath.FromSlash(name))
		if old, err := os.ReadFile(path); err == nil && string(old) == string(data) {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return fmt.Errorf("rotation: %w", err)
		}
		if err := writeAtomic(path, data); err != nil {
			return err
		}
	}
	if err := writeAtomic(filepath.Join(d.Dir, stateFile), s.Files[stateFile]); err != nil {
		return err
	}
	// Removed after every write, not only the first: a first write that
	// stopped after its state must not leave the marker to excuse a state
	// lost later.
	if err := os.Remove(filepath.Join(d.Dir, creatingMarker)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("rotation: %w", err)
	}
	return nil
}

// creatingMarker exists in a CA directory while its first state is being
// written: generations found without a state beside it are the remains of
// a first start that stopped, not a CA whose state was lost.
const creatingMarker = ".creating"

// lockDir takes the exclusive lock of a CA directory, waiting for it. The
// lock file is hidden, so Read skips it; the lock is the kernel's, so it
// ends with the process that held it.
func lockDir(dir string) (unlock func(), err error) {
	l, err := dirlock.Wait(dir, ".lock")
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return func() { _ = l.Unlock() }, nil
}

// writeAtomic replaces path durably, through a temporary file of its own so
// that a concurrent writer (trustmesh ca rotate beside a running serve)
// never shares it.
func writeAtomic(path string, data []byte) error {
	if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	return nil
}

func digest(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// SecretStore keeps the state in one Kubernetes Secret, which every replica
// of the control plane reads: the CA keys never sit in a replica's own data
// directory. Writes use the Secret's resourceVersion for compare-and-swap,
// and only the active and prepared generations are kept.
type SecretStore struct {
	Client    kubernetes.Interface
	Namespace string
	Name      string
}

// Secret data keys cannot hold "/", so "gen-N/<file>" is stored as
// "gen-N.<file>".
func secretKey(name string) string { return strings.Replace(name, "/", ".", 1) }
func fileName(key string) string   { return strings.Replace(key, ".", "/", 1) }
func isGenKey(key string) bool     { return strings.HasPrefix(key, "gen-") }

// Read implements Store.
func (s SecretStore) Read(ctx context.Context) (Snapshot, error) {
	sec, err := s.Client.CoreV1().Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return Snapshot{Files: map[string][]byte{}}, nil
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("rotation: read secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	snap := Snapshot{Files: map[string][]byte{}, Version: sec.ResourceVersion}
	gens := 0
	for k, v := range sec.Data {
		switch {
		case k == stateFile:
			snap.Files[k] = v
		case isGenKey(k):
			snap.Files[fileName(k)] = v
			gens++
		}
	}
	where := fmt.Sprintf("secret %s/%s", s.Namespace, s.Name)
	state, ok := snap.Files[stateFile]
	switch {
	case !ok && gens > 0:
		return Snapshot{}, fmt.Errorf("%w: %s holds CA material but no %s; %s", ErrCorruptState, where, stateFile, restoreHint)
	case ok:
		if _, err := parseState(state); err != nil {
			return Snapshot{}, fmt.Errorf("%w (in %s)", err, where)
		}
	}
	return snap, nil
}

// Write implements Store.
func (s SecretStore) Write(ctx context.Context, snap Snapshot) error {
	st, err := parseState(snap.Files[stateFile])
	if err != nil {
		return err
	}
	keep := map[string]bool{fmt.Sprintf("gen-%d/", st.Active): true}
	if st.Next != 0 {
		keep[fmt.Sprintf("gen-%d/", st.Next)] = true
	}
	data := map[string][]byte{stateFile: snap.Files[stateFile]}
	for name, v := range snap.Files {
		if i := strings.Index(name, "/"); i > 0 && keep[name[:i+1]] {
			data[secretKey(name)] = v
		}
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, ResourceVersion: snap.Version,
			Labels: map[string]string{"app.kubernetes.io/part-of": "trustmesh", "app.kubernetes.io/component": "ca"}},
		Type: corev1.SecretTypeOpaque,
		Data: data,
	}
	if snap.Version == "" {
		_, err = s.Client.CoreV1().Secrets(s.Namespace).Create(ctx, sec, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return ErrConflict
		}
	} else {
		_, err = s.Client.CoreV1().Secrets(s.Namespace).Update(ctx, sec, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return ErrConflict
		}
	}
	if err != nil {
		return fmt.Errorf("rotation: write secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}
