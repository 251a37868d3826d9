// Package conformance holds trustmesh's authorization semantics to Istio's
// own policy compiler.
//
// The oracle (the separate module test/istio-oracle, which keeps istio.io/istio
// out of this module's graph) generates random cases from a seed: a few
// AuthorizationPolicies and a request. It compiles the policies with Istio's
// pilot/pkg/security/authz/builder, for the destination workload as istiod
// would, evaluates the Envoy RBAC with test/envoyrbac, and writes a corpus of
// JSON lines, one Case per line. The test of this package runs every case
// through the engine (the ext_authz Check path, evaluating the Rego back end's
// modules) and the RBAC back end (authz/rbac, evaluated with the same
// test/envoyrbac), and fails on any disagreement that is not a documented
// difference.
//
// testdata/istio-oracle/corpus-seed1.jsonl.gz under authz is the committed
// corpus; `make test` adds a corpus from a fresh seed through
// $TRUSTMESH_ORACLE_CORPUS.
package conformance

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

// Listener kinds: where the request arrives, which decides remote.ip.
const (
	Sidecar = "sidecar"
	Gateway = "gateway"
)

// Case is one line of a corpus.
type Case struct {
	// Seed and N identify the case: the N-th case of the corpus of Seed.
	Seed int64 `json:"seed"`
	N    int   `json:"n"`
	// Policies are AuthorizationPolicy objects (apiVersion, kind, metadata,
	// spec) as Istio reads them. Consecutive cases often share them.
	Policies json.RawMessage `json:"policies"`
	Request  Request         `json:"request"`
	Expect   Expect          `json:"expect"`
}

// Request is a request as the destination's Envoy receives it.
type Request struct {
	// Listener is Sidecar or Gateway: the kind of the destination workload.
	Listener string `json:"listener"`
	// TCP requests go through the network filters: no HTTP attributes.
	TCP  bool     `json:"tcp,omitempty"`
	Dest Workload `json:"dest"`
	// Principal is the peer's SPIFFE ID; empty for a peer without mTLS.
	Principal string `json:"principal,omitempty"`
	// PeerIP is the connection's direct peer.
	PeerIP string `json:"peer_ip"`
	// Forwarded is the client address the request carries beyond the
	// direct peer: at a gateway, the address Envoy derives from
	// X-Forwarded-For (use_remote_address with trusted hops) and sets as
	// x-envoy-external-address; at a sidecar, the x-envoy-external-address
	// (and X-Forwarded-For) the peer sent. Empty for none.
	Forwarded string `json:"forwarded,omitempty"`
	SNI       string `json:"sni,omitempty"`
	// Host is :authority as Envoy presents it after its connection manager
	// normalized it (port and one trailing dot stripped).
	Host    string            `json:"host,omitempty"`
	Method  string            `json:"method,omitempty"`
	Path    string            `json:"path,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
}

// Workload is the destination.
type Workload struct {
	Namespace      string            `json:"ns"`
	ServiceAccount string            `json:"sa"`
	Labels         map[string]string `json:"labels,omitempty"`
	IP             string            `json:"ip"`
	Port           uint32            `json:"port"`
}

// Expect is the oracle's answer.
type Expect struct {
	// Allow is Istio's decision with remote.ip as trustmesh's listener
	// rule computes it (RemoteIP): gateways take the address Envoy derived;
	// sidecars take the forwarded address only from a mesh gateway's
	// identity, else the direct peer.
	Allow    bool   `json:"allow"`
	RemoteIP string `json:"remote_ip"`
	// IstioAllow is Istio's decision with remote.ip as an Istio sidecar
	// computes it (use_remote_address false: the forwarded address, whoever
	// sent it); it differs from Allow only where trustmesh's rule narrows
	// what a client may claim.
	IstioAllow    bool   `json:"istio_allow"`
	IstioRemoteIP string `json:"istio_remote_ip"`
	// Matched names the RBAC policies (ns[NS]-policy[NAME]-rule[I]) that
	// matched, per filter, for the record.
	Matched []string `json:"matched,omitempty"`
}

// GatewayIdentities are the mesh gateway identities of the generated cases:
// a sidecar trusts the forwarded address only from these peers.
var GatewayIdentities = []string{
	"spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway",
}

// IsGatewayIdentity reports whether principal is a mesh gateway's identity.
func IsGatewayIdentity(principal string) bool {
	for _, g := range GatewayIdentities {
		if g == principal {
			return true
		}
	}
	return false
}

// RuleRemoteIP is remote.ip as trustmesh's rule computes it for a request.
func RuleRemoteIP(r *Request) string {
	if r.Forwarded != "" && (r.Listener == Gateway || IsGatewayIdentity(r.Principal)) {
		return r.Forwarded
	}
	return r.PeerIP
}

// IstioRemoteIP is remote.ip as Istio's Envoy computes it: gateways run
// with use_remote_address and trusted hops, sidecars without, so both take
// the forwarded address when there is one.
func IstioRemoteIP(r *Request) string {
	if r.Forwarded != "" {
		return r.Forwarded
	}
	return r.PeerIP
}

// ReadFile reads a corpus, gzipped if its name ends in .gz.
func ReadFile(name string) ([]Case, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("conformance: %w", err)
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(name, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("conformance: %s: %w", name, err)
		}
		defer zr.Close()
		r = zr
	}
	return Read(r)
}

// Read reads JSON lines of cases.
func Read(r io.Reader) ([]Case, error) {
	var out []Case
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	for line := 1; sc.Scan(); line++ {
		if len(strings.TrimSpace(sc.Text())) == 0 {
			continue
		}
		var c Case
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			return nil, fmt.Errorf("conformance: line %d: %w", line, err)
		}
		out = append(out, c)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("conformance: %w", err)
	}
	return out, nil
}

// Writer writes cases as JSON lines.
type Writer struct {
	enc *json.Encoder
}

// NewWriter writes to w.
func NewWriter(w io.Writer) *Writer {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return &Writer{enc: enc}
}

// Write writes one case.
func (w *Writer) Write(c *Case) error {
	if err := w.enc.Encode(c); err != nil {
		return fmt.Errorf("conformance: %w", err)
	}
	return nil
}
