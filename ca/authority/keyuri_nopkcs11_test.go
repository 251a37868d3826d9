//go:build !pkcs11

package authority_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// A binary built without -tags pkcs11 says how to get PKCS#11 support,
// rather than "unsupported kms type".
func TestPKCS11NeedsTheBuildTag(t *testing.T) {
	uri := "pkcs11:token=ca;object=ca-key?pin-source=/etc/trustmesh/pin"
	for name, err := range map[string]error{
		"CheckKeyURI": authority.CheckKeyURI(uri),
		"OpenSigner": func() error {
			_, err := authority.OpenSigner(context.Background(), uri)
			return err
		}(),
	} {
		if !errors.Is(err, authority.ErrKMSNotBuilt) || !strings.Contains(err.Error(), "go build -tags pkcs11") {
			t.Errorf("%s = %v, want it to say the binary needs -tags pkcs11", name, err)
		}
	}
}
