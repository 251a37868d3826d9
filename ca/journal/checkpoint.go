package journal

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
)

// Checkpoint is a signed statement of the log's size and root hash, in the
// C2SP tlog-checkpoint format: the origin, the size and the base64 root hash,
// one per line, as the text of a signed note.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   []byte
}

// Text is the checkpoint body that is signed.
func (c Checkpoint) Text() string {
	return fmt.Sprintf("%s\n%d\n%s\n", c.Origin, c.Size, base64.StdEncoding.EncodeToString(c.Root))
}

// ParseCheckpoint opens a signed checkpoint note with the verifier key vkey
// (note's "name+hash+base64key" form) and parses its body. A note that is not
// signed by that key is an error.
func ParseCheckpoint(signed []byte, vkey string) (Checkpoint, error) {
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return Checkpoint{}, fmt.Errorf("journal: checkpoint key: %w", err)
	}
	n, err := note.Open(signed, note.VerifierList(v))
	if err != nil {
		return Checkpoint{}, fmt.Errorf("journal: checkpoint signature: %w", err)
	}
	return parseCheckpointText(n.Text, v.Name())
}

// parseCheckpointText parses the body of a checkpoint already opened with
// the verifier named origin.
func parseCheckpointText(text, origin string) (Checkpoint, error) {
	lines := strings.Split(text, "\n")
	if len(lines) < 4 {
		return Checkpoint{}, errors.New("journal: checkpoint body is too short")
	}
	size, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil {
		return Checkpoint{}, fmt.Errorf("journal: checkpoint size: %w", err)
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != sha256.Size {
		return Checkpoint{}, fmt.Errorf("journal: checkpoint root hash %q is not a base64 SHA-256", lines[2])
	}
	if lines[0] != origin {
		return Checkpoint{}, fmt.Errorf("journal: checkpoint origin %q is not the key's %q", lines[0], origin)
	}
	return Checkpoint{Origin: lines[0], Size: size, Root: root}, nil
}

// noteSigner signs notes with an Ed25519 crypto.Signer, which may live in a
// KMS; the key hash and verifier key follow the signed-note specification.
type noteSigner struct {
	name   string
	hash   uint32
	signer crypto.Signer
}

const algEd25519 = 1

// NewCheckpointSigner returns a signer for checkpoints of the log named
// origin, and the verifier key outsiders use to check them.
func NewCheckpointSigner(origin string, signer crypto.Signer) (note.Signer, string, error) {
	pub, ok := signer.Public().(ed25519.PublicKey)
	if !ok {
		return nil, "", fmt.Errorf("journal: the checkpoint key must be Ed25519, not %T", signer.Public())
	}
	if !isValidNoteName(origin) {
		return nil, "", fmt.Errorf("journal: %q is not a valid checkpoint origin", origin)
	}
	keyData := append([]byte{algEd25519}, pub...)
	h := sha256.New()
	h.Write([]byte(origin + "\n"))
	h.Write(keyData)
	hash := binary.BigEndian.Uint32(h.Sum(nil))
	vkey := fmt.Sprintf("%s+%08x+%s", origin, hash, base64.StdEncoding.EncodeToString(keyData))
	return &noteSigner{name: origin, hash: hash, signer: signer}, vkey, nil
}

func (s *noteSigner) Name() string    { return s.name }
func (s *noteSigner) KeyHash() uint32 { return s.hash }
func (s *noteSigner) Sign(msg []byte) ([]byte, error) {
	return s.signer.Sign(rand.Reader, msg, crypto.Hash(0))
}

func isValidNoteName(n string) bool {
	return n != "" && !strings.ContainsAny(n, "+ \t\n") && bytes.ContainsFunc([]byte(n), func(r rune) bool { return r > ' ' })
}

// signCheckpoint returns the signed note of c.
func signCheckpoint(c Checkpoint, s note.Signer) ([]byte, error) {
	signed, err := note.Sign(&note.Note{Text: c.Text()}, s)
	if err != nil {
		return nil, fmt.Errorf("journal: sign checkpoint: %w", err)
	}
	return signed, nil
}
