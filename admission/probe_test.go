package admission_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/admission"
)

// The handler answers only its own process's probe, quoting the token: an
// object with another token is reviewed as any other, and a refusal never
// quotes the annotation, so that a control plane cannot take another
// release's webhook for its own.
func TestProbeAnsweredOnlyWithItsToken(t *testing.T) {
	const token, other = "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "aaaabbbbccccddddeeeeffff00001111"
	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler), ProbeToken: token, ProbeIdentity: "trustmesh pod-a"})
	if err != nil {
		t.Fatal(err)
	}
	review := func(doc string) *admissionv1.AdmissionResponse {
		t.Helper()
		body, _ := json.Marshal(admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
			Request:  request(t, admissionv1.Create, "authorizationpolicies", doc)})
		rec := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, admission.Path, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		h.ServeHTTP(rec, r)
		var out admissionv1.AdmissionReview
		if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil || out.Response.UID != "uid-1" {
			t.Fatalf("response %s: %v", rec.Body, err)
		}
		return out.Response
	}
	policy := func(tok, principal string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: shop\n" +
			"  annotations: {" + admission.ProbeAnnotation + ": " + tok + "}\n" +
			"spec:\n  action: DENY\n  rules: [{from: [{source: {principals: [" + principal + "]}}]}]\n"
	}
	// Its own probe: denied, quoting the token, whatever the spec.
	for _, p := range []string{"trustmesh*validation-probe", "cluster.local/ns/a/sa/b"} {
		resp := review(policy(token, p))
		if resp.Allowed || resp.Result == nil || resp.Result.Message != "validation probe "+token+" answered by trustmesh pod-a" {
			t.Errorf("own probe with principal %s: %+v, want denied quoting the token", p, resp)
		}
	}
	// Another token: the invalid probe is refused for its spec, without
	// quoting the annotation; a valid policy with it is admitted.
	resp := review(policy(other, "trustmesh*validation-probe"))
	if resp.Allowed || resp.Result == nil || strings.Contains(resp.Result.Message, other) || strings.Contains(resp.Result.Message, "validation probe") {
		t.Errorf("another process's probe: %+v, want the engine's refusal, not quoting the token", resp)
	}
	if resp := review(policy(other, "cluster.local/ns/a/sa/b")); !resp.Allowed {
		t.Errorf("a valid policy carrying another token: %+v, want admitted", resp)
	}
	// A handler without a token answers no probe.
	h, _ = admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler)})
	if resp := review(policy("", "cluster.local/ns/a/sa/b")); !resp.Allowed {
		t.Errorf("an empty token on a handler without one: %+v, want admitted", resp)
	}
}
