package authority_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// TestEncodeKeyRoundTrips checks the one PEM encoding of private keys: every
// kind of key trustmesh writes comes back, through the software KMS, as a
// signer of the same public key, and a key that cannot leave its signer is
// an error, never an empty file.
func TestEncodeKeyRoundTrips(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for name, key := range map[string]crypto.Signer{"ecdsa-p256": ec, "ed25519": ed, "rsa-2048": rs} {
		t.Run(name, func(t *testing.T) {
			b, err := authority.EncodeKey(key)
			if err != nil {
				t.Fatal(err)
			}
			block, rest := pem.Decode(b)
			if block == nil || block.Type != "PRIVATE KEY" || len(rest) != 0 {
				t.Fatalf("encoded %q; want exactly one PKCS#8 PRIVATE KEY block", b)
			}
			signer, err := authority.SignerFromPEM(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			if !signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(key.Public()) {
				t.Fatal("the key read back is not the key written")
			}
			path := filepath.Join(t.TempDir(), "key.pem")
			if err := authority.WriteKeyFile(path, key); err != nil {
				t.Fatal(err)
			}
			if got, err := os.ReadFile(path); err != nil || string(got) != string(b) {
				t.Fatalf("key file %q, %v; want the encoding", got, err)
			}
			if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("key file mode %v, %v; want owner-only", fi.Mode(), err)
			}
		})
	}
	if _, err := authority.EncodeKey(opaqueSigner{ec}); err == nil {
		t.Fatal("encoded a signer whose key cannot leave it")
	}
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := authority.WriteKeyFile(path, opaqueSigner{ec}); err == nil {
		t.Fatal("wrote a key file for a signer whose key cannot leave it")
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("a failed key write left %s behind (%v)", path, err)
	}
}

// opaqueSigner is a signer whose key cannot be exported, as a KMS key.
type opaqueSigner struct{ k crypto.Signer }

func (o opaqueSigner) Public() crypto.PublicKey { return o.k.Public() }
func (o opaqueSigner) Sign(r io.Reader, d []byte, op crypto.SignerOpts) ([]byte, error) {
	return o.k.Sign(r, d, op)
}
