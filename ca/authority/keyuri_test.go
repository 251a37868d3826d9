package authority_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/ca/authority"
)

func TestRedactKeyURI(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"pkcs11:token=ca;object=k?pin-value=123456", "pkcs11:token=ca;object=k?pin-value=REDACTED"},
		{"pkcs11:token=ca;pin-value=123456;object=k", "pkcs11:token=ca;pin-value=REDACTED;object=k"},
		{"pkcs11:token=ca?pin-source=/p&pin-value=123456", "pkcs11:token=ca?pin-source=/p&pin-value=REDACTED"},
		{"pkcs11:token=ca;object=k?PIN-VALUE=123456", "pkcs11:token=ca;object=k?PIN-VALUE=REDACTED"},
		{"pkcs11:token=ca;object=k?pin%2Dvalue=123456", "pkcs11:token=ca;object=k?pin%2Dvalue=REDACTED"},
		{"yubikey:slot-id=9c?management-key=0102", "yubikey:slot-id=9c?management-key=REDACTED"},
		{"azurekms:name=k;vault=v?client-secret=s3cr3t", "azurekms:name=k;vault=v?client-secret=REDACTED"},
		{"pkcs11:token=ca;object=k?pin-source=/etc/pin", "pkcs11:token=ca;object=k?pin-source=/etc/pin"},
		{"softkms:path=/data/ca-key.pem", "softkms:path=/data/ca-key.pem"},
		{"%%not a uri;pin-value=123456", "%%not a uri;pin-value=123456"},
		{"x:%%bad;pin-value=123456", "x:%%bad;pin-value=REDACTED"},
	} {
		if got := authority.RedactKeyURI(tc.in); got != tc.want {
			t.Errorf("RedactKeyURI(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// CheckKeyURI refuses, before anything opens or stores the URI, what this
// binary cannot use, and never shows a secret in its error.
func TestCheckKeyURI(t *testing.T) {
	dir := t.TempDir()
	pinFile, emptyFile := filepath.Join(dir, "pin"), filepath.Join(dir, "empty")
	if err := os.WriteFile(pinFile, []byte("123456\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(emptyFile, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, uri string
		is        error  // nil for any error
		says      string // in the error
	}{
		{"pin-value", "pkcs11:token=ca;object=k?pin-value=123456", authority.ErrSecretInKeyURI, "pin-source"},
		{"pin-value in the path", "pkcs11:token=ca;object=k;pin-value=123456", authority.ErrSecretInKeyURI, "TRUSTMESH_PKCS11_PIN"},
		{"pin-value with softkms", "softkms:path=/k.pem;pin-value=123456", authority.ErrSecretInKeyURI, "pin-value"},
		{"management-key", "yubikey:slot-id=9c?management-key=123456", authority.ErrSecretInKeyURI, "management-key-source"},
		{"no scheme", "/etc/ca-key.pem", nil, "not a KMS URI"},
		{"unknown KMS", "nosuchkms:key=123456", authority.ErrKMSNotBuilt, "unsupported KMS type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := authority.CheckKeyURI(tc.uri)
			switch {
			case err == nil:
				t.Fatal("accepted")
			case tc.is != nil && !errors.Is(err, tc.is):
				t.Errorf("error %v, want %v", err, tc.is)
			case !strings.Contains(err.Error(), tc.says):
				t.Errorf("error %q does not say %q", err, tc.says)
			}
			if tc.is == authority.ErrSecretInKeyURI && strings.Contains(err.Error(), "123456") {
				t.Errorf("the error shows the secret: %v", err)
			}
		})
	}
	if authority.CheckKeyURI("pkcs11:token=ca") == nil {
		// With the pkcs11 back end built in, its PIN file is checked too.
		for _, tc := range []struct{ uri, says string }{
			{"pkcs11:token=ca;object=k?pin-source=" + filepath.Join(dir, "missing"), "no such file"},
			{"pkcs11:token=ca;object=k?pin-source=" + emptyFile, "is empty"},
			{"pkcs11:token=ca;object=k?pin-source=pin.txt", "absolute path"},
			{"pkcs11:token=ca;object=k?pin-prompt=PIN", "pin-prompt is not supported"},
		} {
			if err := authority.CheckKeyURI(tc.uri); err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("CheckKeyURI(%q) = %v, want it to say %q", tc.uri, err, tc.says)
			}
		}
		if err := authority.CheckKeyURI("pkcs11:token=ca;object=k?pin-source=" + pinFile); err != nil {
			t.Errorf("a readable PIN file: %v", err)
		}
	}
	for _, ok := range []string{"", "softkms:path=/k.pem"} {
		if err := authority.CheckKeyURI(ok); err != nil {
			t.Errorf("CheckKeyURI(%q) = %v", ok, err)
		}
	}
}

// A PIN in a key URI given with --cacerts is refused before it is stored.
func TestReadCACertsRefusesAPIN(t *testing.T) {
	dir := operatorCA(t, nil)
	_, err := authority.ReadCACerts(dir, "pkcs11:token=ca;object=k?pin-value=123456")
	if !errors.Is(err, authority.ErrSecretInKeyURI) || strings.Contains(err.Error(), "123456") {
		t.Fatalf("ReadCACerts = %v, want a refusal without the PIN", err)
	}
}

// A PIN stored in clear by an older trustmesh (DATA/ca/gen-N/ca-key-uri) is
// refused, and not echoed, when the generation is loaded.
func TestLoadFilesRefusesAStoredPIN(t *testing.T) {
	dir := operatorCA(t, nil)
	files, err := authority.ReadCACerts(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	files[authority.CAKeyURIFile] = []byte("pkcs11:token=ca;object=k?pin-value=123456")
	_, err = authority.LoadFiles(context.Background(), files, "", t0)
	if !errors.Is(err, authority.ErrSecretInKeyURI) || strings.Contains(err.Error(), "123456") {
		t.Fatalf("LoadFiles = %v, want a refusal without the PIN", err)
	}
}

// OpenSigner names a KMS key's URI in its errors, redacted, and says which
// pin-source file it could not read.
func TestOpenSignerErrors(t *testing.T) {
	_, err := authority.OpenSigner(context.Background(), "softkms:path=/no/such/key.pem")
	if err == nil || !strings.Contains(err.Error(), "softkms:path=/no/such/key.pem") {
		t.Fatalf("OpenSigner = %v, want an error naming the key", err)
	}
	_, err = authority.OpenSigner(context.Background(), "softkms:path=/no/such/key.pem?pin-value=123456")
	if !errors.Is(err, authority.ErrSecretInKeyURI) || strings.Contains(err.Error(), "123456") {
		t.Fatalf("OpenSigner = %v, want a refusal without the PIN", err)
	}
}
