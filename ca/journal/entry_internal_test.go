package journal

import (
	"bytes"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/rfc6962"
)

// An issuance written before Issuance.Node existed must encode to the same
// bytes today, so that its leaf hash, and every checkpoint over it, still
// verify; a delegated one names its node.
func TestIssuanceNodeKeepsOldLeavesBytes(t *testing.T) {
	at := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	iss := Issuance{
		Time: at, Serial: "1f", SPIFFEID: "spiffe://cluster.local/ns/demo/sa/web", Method: "kubernetes",
		Caller: "system:serviceaccount:demo:web", Origin: OriginKubernetes,
		NotBefore: at.Add(-30 * time.Second), NotAfter: at.Add(time.Hour),
		Issuer: "2a", PublicKeySHA256: "aa", CertSHA256: "bb",
	}
	// The body as the journal wrote it before the node field existed.
	const old = `{"kind":"issuance","record":{"time":"2026-11-23T12:00:00Z","serial":"1f",` +
		`"spiffe_id":"spiffe://cluster.local/ns/demo/sa/web","method":"kubernetes",` +
		`"caller":"system:serviceaccount:demo:web","origin":"kubernetes",` +
		`"not_before":"2026-11-23T11:59:30Z","not_after":"2026-11-23T13:00:00Z",` +
		`"issuer":"2a","public_key_sha256":"aa","cert_sha256":"bb"}}`
	got, err := encode(KindIssuance, iss)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != old {
		t.Fatalf("an issuance without a node encodes to\n%s\nwant the old bytes\n%s", got, old)
	}
	if h := rfc6962.DefaultHasher; !bytes.Equal(h.HashLeaf(got), h.HashLeaf([]byte(old))) {
		t.Fatal("leaf hash changed")
	}
	rec, err := Entry{Kind: KindIssuance, Body: []byte(old)}.Decode()
	if err != nil {
		t.Fatal(err)
	}
	if n := rec.(*Issuance).Node; n != "" {
		t.Fatalf("old leaf decodes with node %q", n)
	}

	iss.Origin, iss.Method, iss.Node = OriginNode, "node-delegated", "node-a"
	got, err = encode(KindIssuance, iss)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, []byte(`"origin":"node"`)) || !bytes.HasSuffix(got, []byte(`"cert_sha256":"bb","node":"node-a"}}`)) {
		t.Fatalf("a delegated issuance encodes to %s; want origin node and node node-a", got)
	}
	rec, err = Entry{Kind: KindIssuance, Body: got}.Decode()
	if err != nil {
		t.Fatal(err)
	}
	if n := rec.(*Issuance).Node; n != "node-a" {
		t.Fatalf("decoded node %q, want node-a", n)
	}
}
