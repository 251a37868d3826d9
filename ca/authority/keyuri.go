package authority

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"unicode"

	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/uri"

	"github.com/trustmesh/trustmesh/internal/secretfile"
)

// PINEnv names the environment variable that holds the PKCS#11 user PIN for
// a pkcs11: key URI that names no pin-source file. trustmesh never stores or
// prints a PIN: a key URI is persisted as given (ca-key-uri), so the PIN
// must stay out of it.
const PINEnv = "TRUSTMESH_PKCS11_PIN"

var (
	// ErrKMSNotBuilt marks a key URI whose KMS back end this binary was
	// built without.
	ErrKMSNotBuilt = errors.New("KMS back end not built in")
	// ErrSecretInKeyURI marks a key URI that carries a secret (a PIN) in
	// clear, which trustmesh refuses rather than store or print it.
	ErrSecretInKeyURI = errors.New("a key URI may not hold a secret")
)

// secretAttributes are the key URI attributes whose value is a secret, with
// what to use instead. Their values are redacted wherever a URI is printed.
var secretAttributes = map[string]string{
	"pin-value":      "name a file that holds the PIN with pin-source=FILE (RFC 7512), or set " + PINEnv,
	"management-key": "name a file that holds it with management-key-source=FILE",
	"client-secret":  "use a credentials file or the environment instead",
}

// buildTags are the build tags that link the optional KMS back ends.
var buildTags = map[apiv1.Type]string{
	apiv1.PKCS11:    "pkcs11",
	apiv1.AmazonKMS: "awskms",
	apiv1.CloudKMS:  "cloudkms",
}

// RedactKeyURI returns keyURI with the value of every secret attribute
// (pin-value, management-key, client-secret) replaced by REDACTED. Every
// message that shows a key URI shows it through this function. It works on
// the text, so that even a URI that does not parse is printed safely.
func RedactKeyURI(keyURI string) string {
	scheme, rest, ok := strings.Cut(keyURI, ":")
	if !ok {
		return keyURI
	}
	var b strings.Builder
	b.WriteString(scheme)
	b.WriteByte(':')
	for rest != "" {
		i := strings.IndexAny(rest, ";?&")
		seg, sep := rest, ""
		if i >= 0 {
			seg, sep, rest = rest[:i], rest[i:i+1], rest[i+1:]
		} else {
			rest = ""
		}
		if k, _, found := strings.Cut(seg, "="); found && isSecretAttribute(k) {
			seg = k + "=REDACTED"
		}
		b.WriteString(seg)
		b.WriteString(sep)
	}
	return b.String()
}

func isSecretAttribute(rawKey string) bool {
	k, err := url.QueryUnescape(rawKey)
	if err != nil {
		k = rawKey
	}
	_, secret := secretAttributes[strings.ToLower(strings.TrimSpace(k))]
	return secret
}

// CheckKeyURI reports whether this binary can use keyURI, without opening
// the key: the URI parses, names a KMS this binary was built with
// (ErrKMSNotBuilt says which build tag links it), carries no secret in
// clear (ErrSecretInKeyURI: a PIN comes from a pin-source file or PINEnv),
// and a pin-source file it names can be read. An empty URI is valid: it
// means no KMS. Start-up and serve --validate both call it.
func CheckKeyURI(keyURI string) error {
	if keyURI == "" {
		return nil
	}
	_, _, err := parseKeyURI(keyURI)
	return err
}

// parseKeyURI is CheckKeyURI that also returns the parsed URI and its type.
func parseKeyURI(keyURI string) (*uri.URI, apiv1.Type, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("authority: key URI %s: "+format, append([]any{RedactKeyURI(keyURI)}, args...)...)
	}
	u, err := uri.Parse(keyURI)
	if err != nil {
		return nil, "", fail("not a KMS URI (scheme:attributes, for example pkcs11:token=ca;object=ca-key?pin-source=FILE)")
	}
	var secrets []string
	for _, values := range []url.Values{u.Values, u.URL.Query()} {
		for k := range values {
			if _, ok := secretAttributes[strings.ToLower(k)]; ok {
				secrets = append(secrets, k)
			}
		}
	}
	if len(secrets) > 0 {
		sort.Strings(secrets)
		return nil, "", fail("%w: %s would be stored with the CA and shown in messages; %s",
			ErrSecretInKeyURI, secrets[0], secretAttributes[strings.ToLower(secrets[0])])
	}
	typ := apiv1.Type(strings.ToLower(u.Scheme))
	if _, ok := apiv1.LoadKeyManagerNewFunc(typ); !ok {
		switch tag, known := buildTags[typ]; {
		case typ == apiv1.PKCS11:
			return nil, "", fail("%w: this trustmesh binary was built without PKCS#11 support; build with `go build -tags pkcs11` (cgo, CGO_ENABLED=1)", ErrKMSNotBuilt)
		case known:
			return nil, "", fail("%w: this trustmesh binary was built without %s support; build with `go build -tags %s`", ErrKMSNotBuilt, typ, tag)
		default:
			return nil, "", fail("%w: unsupported KMS type %q (this binary has softkms%s)", ErrKMSNotBuilt, u.Scheme, builtIn())
		}
	}
	if typ == apiv1.PKCS11 {
		if u.Has("pin-prompt") {
			return nil, "", fail("pin-prompt is not supported by a server; name a PIN file with pin-source=FILE, or set %s", PINEnv)
		}
		if _, err := pkcs11PIN(u); err != nil {
			return nil, "", fail("%w", err)
		}
	}
	return u, typ, nil
}

// builtIn lists the optional KMS back ends linked into this binary.
func builtIn() string {
	var s string
	for _, t := range []apiv1.Type{apiv1.PKCS11, apiv1.AmazonKMS, apiv1.CloudKMS} {
		if _, ok := apiv1.LoadKeyManagerNewFunc(t); ok {
			s += ", " + string(t)
		}
	}
	return s
}

// pkcs11PIN resolves a PKCS#11 URI's PIN: the content of its pin-source
// file (RFC 7512), else PINEnv, else none (a token without login). The PIN
// is kept in memory only. go.step.sm/crypto would read pin-source itself,
// but it turns an unreadable file silently into an empty PIN; this says
// which file could not be read.
func pkcs11PIN(u *uri.URI) (string, error) {
	if path := u.Get("pin-source"); path != "" {
		// As go.step.sm/crypto reads it: a path or a file: URL.
		if fu, err := url.Parse(path); err == nil && (fu.Scheme == "" || fu.Scheme == "file") {
			switch {
			case fu.Path != "":
				path = fu.Path
			case fu.Opaque != "":
				path = fu.Opaque
			}
		}
		if !filepath.IsAbs(path) {
			// The URI is stored with the CA and read again by later
			// starts, from whatever directory they run in.
			return "", fmt.Errorf("pin-source %s must be an absolute path", path)
		}
		b, err := secretfile.ReadOwnerOnly(path)
		if err != nil {
			return "", fmt.Errorf("pin-source: %w", err)
		}
		pin := string(bytes.TrimRightFunc(b, unicode.IsSpace))
		if pin == "" {
			return "", fmt.Errorf("pin-source %s is empty", path)
		}
		return pin, nil
	}
	return os.Getenv(PINEnv), nil
}
