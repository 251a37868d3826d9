package journal

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// AlgCosignatureV1 is the signed-note key type of C2SP tlog-cosignature's
// cosignature/v1 (Ed25519 over a timestamped checkpoint).
const AlgCosignatureV1 = 0x04

// CosignatureMessage is what a cosignature/v1 signs: a header with the
// time, then the checkpoint's body.
func CosignatureMessage(cp Checkpoint, t uint64) []byte {
	return []byte("cosignature/v1\ntime " + strconv.FormatUint(t, 10) + "\n" + cp.Text())
}

// ErrCosignature: a cosignature line does not verify with the witness's
// key over the checkpoint.
var ErrCosignature = errors.New("journal: the cosignature does not verify")

// VerifyCosignature checks a signed-note signature line ("— name
// base64(key ID || timestamp || Ed25519 signature)") made by the witness
// whose cosignature/v1 verifier key is vkey over cp, and returns its time.
func VerifyCosignature(vkey string, cp Checkpoint, line []byte) (time.Time, error) {
	name, hash, key, err := ParseCosignatureKey(vkey)
	if err != nil {
		return time.Time{}, err
	}
	s := strings.TrimSuffix(string(line), "\n")
	rest, ok := strings.CutPrefix(s, "— "+name+" ")
	if !ok {
		return time.Time{}, fmt.Errorf("%w: not a signature line of %s", ErrCosignature, name)
	}
	blob, err := base64.StdEncoding.DecodeString(rest)
	if err != nil || len(blob) != 4+8+ed25519.SignatureSize {
		return time.Time{}, fmt.Errorf("%w: malformed", ErrCosignature)
	}
	if binary.BigEndian.Uint32(blob[:4]) != hash {
		return time.Time{}, fmt.Errorf("%w: made by another key", ErrCosignature)
	}
	t := binary.BigEndian.Uint64(blob[4:12])
	if !ed25519.Verify(key, CosignatureMessage(cp, t), blob[12:]) {
		return time.Time{}, fmt.Errorf("%w: invalid signature", ErrCosignature)
	}
	return time.Unix(int64(t), 0).UTC(), nil
}

// ParseCosignatureKey splits a cosignature/v1 verifier key
// ("name+hash+base64(0x04 || public key)") and checks that its hash is the
// one signed-note derives from the name and key.
func ParseCosignatureKey(vkey string) (name string, hash uint32, key ed25519.PublicKey, err error) {
	bad := fmt.Errorf("journal: %q is not a cosignature/v1 verifier key", vkey)
	name, rest, ok1 := strings.Cut(vkey, "+")
	h, k, ok2 := strings.Cut(rest, "+")
	if !ok1 || !ok2 || name == "" || len(h) != 8 {
		return "", 0, nil, bad
	}
	hv, err := strconv.ParseUint(h, 16, 32)
	if err != nil {
		return "", 0, nil, bad
	}
	raw, err := base64.StdEncoding.DecodeString(k)
	if err != nil || len(raw) != 1+ed25519.PublicKeySize || raw[0] != AlgCosignatureV1 {
		return "", 0, nil, bad
	}
	if NoteKeyHash(name, raw) != uint32(hv) {
		return "", 0, nil, fmt.Errorf("journal: the verifier key %q has a key hash that does not match its name and key", vkey)
	}
	return name, uint32(hv), ed25519.PublicKey(raw[1:]), nil
}

// NoteKeyHash is the signed-note key hash of the key named name whose key
// data (type byte, then the public key) is keyData.
func NoteKeyHash(name string, keyData []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write(keyData)
	return binary.BigEndian.Uint32(h.Sum(nil))
}

// Cosigned is a checkpoint a witness cosigned, both signatures verified.
type Cosigned struct {
	Checkpoint
	// Witness is the witness's key name, and At the time in its
	// cosignature.
	Witness string
	At      time.Time
}

// OpenCosigned verifies a cosigned checkpoint as serve keeps it
// (WitnessCosignedFile): the log's signature with logKey, then a
// cosignature/v1 line by witnessKey.
func OpenCosigned(signed []byte, logKey, witnessKey string) (Cosigned, error) {
	cp, err := ParseCheckpoint(signed, logKey)
	if err != nil {
		return Cosigned{}, err
	}
	name, _, _, err := ParseCosignatureKey(witnessKey)
	if err != nil {
		return Cosigned{}, err
	}
	_, sigs, _ := strings.Cut(string(signed), "\n\n")
	err = fmt.Errorf("%w: no signature line by %s", ErrCosignature, name)
	for _, line := range strings.SplitAfter(sigs, "\n") {
		if !strings.HasPrefix(line, "— "+name+" ") {
			continue
		}
		at, verr := VerifyCosignature(witnessKey, cp, []byte(line))
		if verr == nil {
			return Cosigned{Checkpoint: cp, Witness: name, At: at}, nil
		}
		err = verr
	}
	return Cosigned{}, err
}
