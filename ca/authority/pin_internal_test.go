package authority

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.step.sm/crypto/kms/uri"
)

// A pin-source file that others than its owner can access is refused, as
// ssh refuses such a private key; an owner-only one is read. pkcs11PIN is
// tested directly: without -tags pkcs11, CheckKeyURI stops before the PIN.
func TestPINFileMustBeOwnerOnly(t *testing.T) {
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pin")
	if err := os.WriteFile(pinFile, []byte("123456\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	read := func() (string, error) {
		u, err := uri.Parse("pkcs11:token=ca;object=k?pin-source=" + pinFile)
		if err != nil {
			t.Fatal(err)
		}
		return pkcs11PIN(u)
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		if err := os.Chmod(pinFile, mode); err != nil {
			t.Fatal(err)
		}
		if pin, err := read(); err != nil || pin != "123456" {
			t.Errorf("mode %#o: pkcs11PIN = %q, %v; want the PIN", mode, pin, err)
		}
	}
	for _, mode := range []os.FileMode{0o640, 0o604, 0o644, 0o610, 0o660} {
		if err := os.Chmod(pinFile, mode); err != nil {
			t.Fatal(err)
		}
		pin, err := read()
		if err == nil {
			t.Errorf("mode %#o: pkcs11PIN = %q; want a refusal", mode, pin)
			continue
		}
		for _, want := range []string{pinFile, "chmod 600"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("mode %#o: error %q does not say %q", mode, err, want)
			}
		}
		if strings.Contains(err.Error(), "123456") {
			t.Errorf("the error shows the PIN: %v", err)
		}
	}
	if _, err := func() (string, error) {
		u, _ := uri.Parse("pkcs11:token=ca;object=k?pin-source=" + dir)
		return pkcs11PIN(u)
	}(); err == nil {
		t.Error("a directory as pin-source was accepted")
	}
}
