//go:build pkcs11 && cgo

package authority

// Building with -tags pkcs11 (and cgo) links the pkcs11 back end of
// go.step.sm/crypto/kms, so that --ca-key-uri may name a key there. It is
// left out of default builds to keep the binary free of cgo and of that back
// end's dependencies; without it, CheckKeyURI says how to build it in. Its
// registration with go.step.sm/crypto/kms is how CheckKeyURI knows it is
// there. Without cgo the back end could only refuse, so it is left out too.
import _ "go.step.sm/crypto/kms/pkcs11"
