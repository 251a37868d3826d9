package witness

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// algCosignatureV1 is the signed-note key type of C2SP tlog-cosignature's
// cosignature/v1 (Ed25519 over a timestamped checkpoint).
const algCosignatureV1 = 0x04

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
	keyData := append([]byte{algCosignatureV1}, pub...)
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write(keyData)
	c := &cosigner{name: name, key: key}
	copy(c.id[:], h.Sum(nil))
	c.vkey = fmt.Sprintf("%s+%08x+%s", name, binary.BigEndian.Uint32(c.id[:]), base64.StdEncoding.EncodeToString(keyData))
	return c, nil
}

// cosignedMessage is what cosignature/v1 signs: a header with the time,
// then the checkpoint's body.
func cosignedMessage(cp journal.Checkpoint, t uint64) []byte {
	return []byte("cosignature/v1\ntime " + strconv.FormatUint(t, 10) + "\n" + cp.Text())
}

// cosign returns the signed-note signature line of the cosignature of cp
// at now: "— name base64(key ID || timestamp || signature)".
func (c *cosigner) cosign(cp journal.Checkpoint, now time.Time) ([]byte, error) {
	t := uint64(now.Unix())
	sig := ed25519.Sign(c.key, cosignedMessage(cp, t))
	blob := make([]byte, 0, 4+8+len(sig))
	blob = append(blob, c.id[:]...)
	blob = binary.BigEndian.AppendUint64(blob, t)
	blob = append(blob, sig...)
	return []byte("— " + c.name + " " + base64.StdEncoding.EncodeToString(blob) + "\n"), nil
}

// VerifyCosignature checks a cosignature line made by the witness whose
// verifier key is vkey over the checkpoint cp, and returns its time.
func VerifyCosignature(vkey string, cp journal.Checkpoint, line []byte) (time.Time, error) {
	name, hash, key, ok := splitVKey(vkey)
	if !ok || len(key) != 1+ed25519.PublicKeySize || key[0] != algCosignatureV1 {
		return time.Time{}, fmt.Errorf("witness: %q is not a cosignature/v1 key", vkey)
	}
	s := strings.TrimSuffix(string(line), "\n")
	rest, ok := strings.CutPrefix(s, "— "+name+" ")
	if !ok {
		return time.Time{}, fmt.Errorf("witness: not a signature line of %s", name)
	}
	blob, err := base64.StdEncoding.DecodeString(rest)
	if err != nil || len(blob) != 4+8+ed25519.SignatureSize {
		return time.Time{}, errors.New("witness: malformed cosignature")
	}
	if binary.BigEndian.Uint32(blob[:4]) != hash {
		return time.Time{}, errors.New("witness: cosignature by another key")
	}
	t := binary.BigEndian.Uint64(blob[4:12])
	if !ed25519.Verify(ed25519.PublicKey(key[1:]), cosignedMessage(cp, t), blob[12:]) {
		return time.Time{}, errors.New("witness: invalid cosignature")
	}
	return time.Unix(int64(t), 0).UTC(), nil
}

func splitVKey(vkey string) (name string, hash uint32, key []byte, ok bool) {
	name, rest, ok1 := strings.Cut(vkey, "+")
	h, k, ok2 := strings.Cut(rest, "+")
	if !ok1 || !ok2 {
		return "", 0, nil, false
	}
	hv, err := strconv.ParseUint(h, 16, 32)
	if err != nil || len(h) != 8 {
		return "", 0, nil, false
	}
	key, err = base64.StdEncoding.DecodeString(k)
	if err != nil {
		return "", 0, nil, false
	}
	return name, uint32(hv), key, true
}
