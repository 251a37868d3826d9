package rotation

import (
	"fmt"
	"strings"
)

// A Snapshot names generation n's files "gen-<n>/<cacerts file name>".
func genPrefix(n int) string { return fmt.Sprintf("gen-%d/", n) }

// genFiles returns generation n's files by their cacerts names.
func genFiles(snap Snapshot, n int) map[string][]byte {
	out := map[string][]byte{}
	p := genPrefix(n)
	for name, v := range snap.Files {
		if strings.HasPrefix(name, p) {
			out[strings.TrimPrefix(name, p)] = v
		}
	}
	return out
}

// putGeneration adds files to snap as generation n.
func putGeneration(snap Snapshot, n int, files map[string][]byte) {
	for name, data := range files {
		snap.Files[genPrefix(n)+name] = data
	}
}
