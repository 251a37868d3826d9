package witness

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// cosigner signs cosignature/v1 lines.
type cosigner struct {
	name string
	id   [4]byte
	key  ed25519.PrivateKey
	vkey string
}

const (
	keyFile = "witness.key"
	pubFile = "witness.pub"
)

// loadOrCreateCosigner reads the witness key from dir, creating it named
// name on first use.
func loadOrCreateCosigner(dir, name string) (*cosigner, error) {
	path := filepath.Join(dir, keyFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		// "name seed": the name is the key's, whatever --name says now.
		n, seed, ok := strings.Cut(strings.TrimSpace(string(b)), " ")
		raw, derr := base64.StdEncoding.DecodeString(seed)
		if !ok || derr != nil || len(raw) != ed25519.SeedSize {
			return nil, fmt.Errorf("witness: %s is not a witness key", path)
		}
		return newCosigner(n, ed25519.NewKeyFromSeed(raw))
	case errors.Is(err, os.ErrNotExist):
		if name == "" {
			return nil, errors.New("witness: give the witness a name for its new key")
		}
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("witness: %w", err)
		}
		c, err := newCosigner(name, key)
		if err != nil {
			return nil, err
		}
		if err := atomicfile.WriteFile(path, []byte(name+" "+base64.StdEncoding.EncodeToString(key.Seed())+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("witness: %w", err)
		}
		if err := atomicfile.WriteFile(filepath.Join(dir, pubFile), []byte(c.vkey+"\n"), 0o644); err != nil {
			return nil, fmt.Errorf("witness: %w", err)
		}
		return c, nil
	default:
		return nil, fmt.Errorf("witness: %w", err)
	}
}

func newCosigner(name string, key ed25519.PrivateKey) (*cosigner, error) {
	if name == "" || strings.ContainsAny(name, "+ \t\n") {
		return nil, fmt.Errorf("witness: %q is not a valid key name", name)
	}
	pub := key.Public().(ed25519.PublicKey)
	keyData := append([]byte{journal.AlgCosignatureV1}, pub...)
	c := &cosigner{name: name, key: key}
	binary.BigEndian.PutUint32(c.id[:], journal.NoteKeyHash(name, keyData))
	c.vkey = fmt.Sprintf("%s+%08x+%s", name, binary.BigEndian.Uint32(c.id[:]), base64.StdEncoding.EncodeToString(keyData))
	return c, nil
}

// cosign returns the signed-note signature line of the cosignature of cp
// at now: "— name base64(key ID || timestamp || signature)".
func (c *cosigner) cosign(cp journal.Checkpoint, now time.Time) ([]byte, error) {
	t := uint64(now.Unix())
	sig := ed25519.Sign(c.key, journal.CosignatureMessage(cp, t))
	blob := make([]byte, 0, 4+8+len(sig))
	blob = append(blob, c.id[:]...)
	blob = binary.BigEndian.AppendUint64(blob, t)
	blob = append(blob, sig...)
	return []byte("— " + c.name + " " + base64.StdEncoding.EncodeToString(blob) + "\n"), nil
}
