// Command istio-oracle writes a corpus of authorization cases whose expected
// decisions come from Istio's own policy compiler.
//
// For a seed it generates random AuthorizationPolicies and requests (see
// gen.go), compiles the policies that apply to each request's destination
// workload with Istio's pilot/pkg/security/authz/builder, as istiod does,
// and evaluates the Envoy RBAC it generates with test/envoyrbac. Each line
// of the output is an authz/conformance.Case; the test of authz/conformance
// holds trustmesh to them.
//
// This is a module of its own so that istio.io/istio never enters the main
// module's graph.
//
//	go run . -seed 1 -cases 10000 -out corpus.jsonl.gz
package main

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/conformance"
)

// groupSize is how many requests share one policy set: consecutive cases
// share their policies, so the checker compiles each set once.
const groupSize = 8

func main() {
	seed := flag.Int64("seed", 1, "seed of the random cases")
	n := flag.Int("cases", 10000, "number of cases")
	out := flag.String("out", "-", "output file (.gz to compress), - for stdout")
	flag.Parse()
	if err := run(*seed, *n, *out); err != nil {
		fmt.Fprintln(os.Stderr, "istio-oracle:", err)
		os.Exit(1)
	}
}

func run(seed int64, n int, out string) (err error) {
	var w io.Writer = os.Stdout
	if out != "-" {
		f, err := os.Create(out)
		if err != nil {
			return err
		}
		defer func() {
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}()
		w = f
		if strings.HasSuffix(out, ".gz") {
			zw := gzip.NewWriter(f)
			defer func() {
				if cerr := zw.Close(); err == nil {
					err = cerr
				}
			}()
			w = zw
		}
	}
	cw := conformance.NewWriter(w)
	g := &gen{r: rand.New(rand.NewPCG(uint64(seed), 0x7275737473)), seed: seed}
	allowed := 0
	for i := 0; i < n; {
		ps := g.policies()
		raw, err := ps.json()
		if err != nil {
			return err
		}
		cache := map[string]*compiled{}
		for j := 0; j < groupSize && i < n; j, i = j+1, i+1 {
			req := g.request()
			key := req.Dest.Namespace + "/" + req.Dest.ServiceAccount
			c, ok := cache[key]
			if !ok {
				if c, err = compile(ps, req.Dest); err != nil {
					return fmt.Errorf("case %d: %w", i, err)
				}
				cache[key] = c
			}
			cs := &conformance.Case{Seed: seed, N: i, Policies: raw, Request: req}
			cs.Expect.RemoteIP = conformance.RuleRemoteIP(&req)
			if cs.Expect.Allow, cs.Expect.Matched, err = c.decide(&req, cs.Expect.RemoteIP); err != nil {
				return fmt.Errorf("case %d: %w", i, err)
			}
			cs.Expect.IstioRemoteIP = conformance.IstioRemoteIP(&req)
			if cs.Expect.IstioAllow, _, err = c.decide(&req, cs.Expect.IstioRemoteIP); err != nil {
				return fmt.Errorf("case %d: %w", i, err)
			}
			if cs.Expect.Allow {
				allowed++
			}
			if err := cw.Write(cs); err != nil {
				return err
			}
		}
	}
	fmt.Fprintf(os.Stderr, "istio-oracle: seed %d: %d cases, %d allowed\n", seed, n, allowed)
	return nil
}

// json renders the policies as Istio objects, compactly and
// deterministically.
func (ps *policySet) json() (json.RawMessage, error) {
	type meta struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		Annotations map[string]string `json:"annotations,omitempty"`
	}
	type obj struct {
		APIVersion string          `json:"apiVersion"`
		Kind       string          `json:"kind"`
		Metadata   meta            `json:"metadata"`
		Spec       json.RawMessage `json:"spec"`
	}
	var objs []obj
	for _, o := range ps.objs {
		spec, err := protojson.Marshal(o.Spec)
		if err != nil {
			return nil, err
		}
		var b bytes.Buffer
		if err := json.Compact(&b, spec); err != nil {
			return nil, err
		}
		objs = append(objs, obj{APIVersion: "security.istio.io/v1", Kind: "AuthorizationPolicy",
			Metadata: meta{Name: o.Name, Namespace: o.Namespace, Annotations: o.Annotations}, Spec: b.Bytes()})
	}
	return json.Marshal(objs)
}
