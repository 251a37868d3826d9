package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"sort"
)

// Digest names a policy set by its content: "sha256:" and the hex digest
// of the policies' model, sorted by Key, without their Origin. Two sources
// that hold the same policies (a directory and the cluster, or a running
// control plane and `trustmesh xds dump`) give the same digest.
func Digest(ps []*Policy) string {
	sorted := make([]Policy, 0, len(ps))
	for _, p := range ps {
		c := *p
		c.Origin = ""
		sorted = append(sorted, c)
	}
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Key() < sorted[j].Key() })
	// The model is plain data (strings, maps, slices, netip.Prefix), which
	// encoding/json renders deterministically, map keys sorted.
	b, err := json.Marshal(sorted)
	if err != nil {
		// Unreachable for the model's types; a digest that cannot be
		// computed must still never match another set's.
		panic("policy: digest: " + err.Error())
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
