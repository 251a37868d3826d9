//go:build cloudkms

package authority

// Building with -tags cloudkms links the cloudkms back end of go.step.sm/crypto/kms, so
// that --ca-key-uri may name a key there. It is left out of default builds
// to keep the binary free of that back end's dependencies.
import _ "go.step.sm/crypto/kms/cloudkms"
