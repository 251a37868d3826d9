package admission_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	goruntime "runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
)

// request builds an AdmissionRequest for an object given in YAML, of the
// resource of its apiVersion.
func request(t *testing.T, op admissionv1.Operation, resource, doc string) *admissionv1.AdmissionRequest {
	t.Helper()
	js, err := yaml.YAMLToJSON([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name, Namespace string
		} `json:"metadata"`
	}
	if err := json.Unmarshal(js, &meta); err != nil {
		t.Fatal(err)
	}
	group, version, _ := strings.Cut(meta.APIVersion, "/")
	return &admissionv1.AdmissionRequest{
		UID:       "uid-1",
		Kind:      metav1.GroupVersionKind{Group: group, Version: version, Kind: meta.Kind},
		Resource:  metav1.GroupVersionResource{Group: group, Version: version, Resource: resource},
		Name:      meta.Metadata.Name,
		Namespace: meta.Metadata.Namespace,
		Operation: op,
		Object:    runtime.RawExtension{Raw: js},
	}
}

const badProvider = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
`

const jwt = `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["issuer/subject"]}}]
    to: [{operation: {ports: ["99999"]}}]
`

// terminating is a good policy being deleted; its dry-run annotation is
// a value the load refuses.
const terminating = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: jwt
  namespace: shop
  deletionTimestamp: '2026-01-01T00:00:00Z'
  annotations: {istio.io/dry-run: 'maybe'}
spec:
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]}]
`

func TestReview(t *testing.T) {
	for _, tc := range []struct {
		name, resource, doc string
		op                  admissionv1.Operation
		outcome             string
		// causes are the denial's causes, "field: message prefix".
		causes []string
		// warning is a substring of the one warning.
		warning string
		// old is the object an UPDATE replaces.
		old string
	}{
		{name: "good policy", resource: "authorizationpolicies", outcome: admission.OutcomeAllowed, doc: `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]}]
`},
		{name: "provider the engine refuses", resource: "authorizationpolicies", doc: badProvider, outcome: admission.OutcomeDenied,
			causes: []string{`spec.provider.name: unknown extension provider: "opa": providers are Rego decisions named rego:<path>`}},
		{name: "provider with no bundle loaded", resource: "authorizationpolicies", outcome: admission.OutcomeDenied,
			doc:    strings.Replace(badProvider, "{name: opa}", `{name: "rego:nobody/allow"}`, 1),
			causes: []string{`spec.provider.name: unknown extension provider: "rego:nobody/allow": this CUSTOM provider needs a Rego bundle that defines data.nobody.allow, and no loaded bundle does`}},
		{name: "every refused field of a v1beta1 policy", resource: "authorizationpolicies", doc: jwt, outcome: admission.OutcomeDenied,
			causes: []string{
				"spec.rules[0].from[0].source.requestPrincipals: not supported: needs request authentication (JWT)",
				"spec.rules[0].from[0].source: invalid: must not be empty",
				`spec.rules[0].to[0].operation.ports[0]: invalid: "99999": not a port number`,
			}},
		{name: "an update is checked as a create", resource: "authorizationpolicies", doc: jwt, op: admissionv1.Update, outcome: admission.OutcomeDenied,
			causes: []string{"spec.rules[0].from[0].source.requestPrincipals: not supported", "spec.rules[0].from[0].source: invalid", "spec.rules[0].to[0].operation.ports[0]: invalid"}},
		{name: "delete", resource: "authorizationpolicies", doc: jwt, op: admissionv1.Delete, outcome: admission.OutcomeAllowed},
		{name: "status subresource", resource: "authorizationpolicies", doc: jwt, op: admissionv1.Update, outcome: admission.OutcomeAllowed},
		{name: "metadata-only update of a refused policy being deleted", resource: "authorizationpolicies", op: admissionv1.Update, outcome: admission.OutcomeAllowed,
			doc: strings.Replace(jwt, "namespace: shop}", "namespace: shop, deletionTimestamp: '2026-01-01T00:00:00Z'}", 1),
			old: strings.Replace(jwt, "namespace: shop}", "namespace: shop, deletionTimestamp: '2026-01-01T00:00:00Z', finalizers: [example.com/hold]}", 1)},
		{name: "spec change of a policy being deleted is checked", resource: "authorizationpolicies", op: admissionv1.Update, outcome: admission.OutcomeDenied,
			doc:    strings.Replace(jwt, "namespace: shop}", "namespace: shop, deletionTimestamp: '2026-01-01T00:00:00Z'}", 1),
			old:    strings.Replace(terminating, "{istio.io/dry-run: 'maybe'}", "{}", 1),
			causes: []string{"spec.rules[0].from[0].source.requestPrincipals: not supported", "spec.rules[0].from[0].source: invalid", "spec.rules[0].to[0].operation.ports[0]: invalid"}},
		{name: "dry-run change of a policy being deleted is checked", resource: "authorizationpolicies", op: admissionv1.Update, outcome: admission.OutcomeDenied,
			doc: terminating, old: strings.Replace(terminating, "{istio.io/dry-run: 'maybe'}", "{other: x}", 1),
			causes: []string{"metadata.annotations[istio.io/dry-run]: invalid"}},
		{name: "not ours", resource: "requestauthentications", outcome: admission.OutcomeAllowed, doc: `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: r, namespace: shop}
spec: {jwtRules: [{issuer: x}]}
`},
		{name: "spec that does not decode", resource: "authorizationpolicies", outcome: admission.OutcomeError, doc: `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: x, namespace: shop}
spec: {rules: "all"}
`},
		{name: "STRICT PeerAuthentication", resource: "peerauthentications", outcome: admission.OutcomeAllowed, doc: `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
`},
		{name: "PERMISSIVE PeerAuthentication", resource: "peerauthentications", outcome: admission.OutcomeWarned,
			warning: "trustmesh ignores PeerAuthentication shop/default: mtls.mode PERMISSIVE refused: trustmesh enforces STRICT mTLS only",
			doc: `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
`},
		{name: "external ServiceEntry", resource: "serviceentries", outcome: admission.OutcomeAllowed, doc: `apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec: {hosts: [api.example.com], location: MESH_EXTERNAL, resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP}]}
`},
		{name: "internal ServiceEntry", resource: "serviceentries", outcome: admission.OutcomeWarned,
			warning: "trustmesh ignores ServiceEntry shop/db: only location MESH_EXTERNAL is supported", doc: `apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec: {hosts: [db.internal], location: MESH_INTERNAL, resolution: DNS, ports: [{number: 5432, name: pg, protocol: TCP}]}
`},
		{name: "Gateway with a passthrough server", resource: "gateways", outcome: admission.OutcomeWarned,
			warning: "trustmesh ignores Gateway edge/in: servers[1]: tls.mode PASSTHROUGH is not supported", doc: `apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: in, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: a}}
  - {port: {number: 8443, name: tls, protocol: TLS}, hosts: [b.example.com], tls: {mode: PASSTHROUGH}}
`},
		{name: "VirtualService", resource: "virtualservices", outcome: admission.OutcomeAllowed, doc: `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: edge}
spec: {hosts: [a.example.com], gateways: [in], http: [{route: [{destination: {host: web.shop.svc.cluster.local}}]}]}
`},
		{name: "VirtualService that does not decode", resource: "virtualservices", outcome: admission.OutcomeError, doc: `apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: web, namespace: edge}
spec: {hosts: a.example.com}
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			op := tc.op
			if op == "" {
				op = admissionv1.Create
			}
			req := request(t, op, tc.resource, tc.doc)
			if tc.old != "" {
				req.OldObject = request(t, op, tc.resource, tc.old).Object
			}
			if tc.name == "status subresource" {
				req.SubResource = "status"
			}
			resp, outcome := admission.Review(req, nil)
			if outcome != tc.outcome {
				t.Fatalf("outcome %s, want %s (%+v)", outcome, tc.outcome, resp.Result)
			}
			if resp.Allowed != (outcome != admission.OutcomeDenied && outcome != admission.OutcomeError) {
				t.Fatalf("allowed %v with outcome %s", resp.Allowed, outcome)
			}
			if tc.warning == "" && len(resp.Warnings) > 0 || tc.warning != "" && (len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], tc.warning)) {
				t.Errorf("warnings %q, want one holding %q", resp.Warnings, tc.warning)
			}
			if resp.Allowed {
				return
			}
			st := resp.Result
			if st == nil || st.Details == nil || st.Details.Kind != req.Kind.Kind || st.Details.Name != req.Name {
				t.Fatalf("denial %+v names no object", st)
			}
			if outcome == admission.OutcomeError {
				if st.Code != http.StatusBadRequest || !strings.Contains(st.Message, "decode") {
					t.Errorf("decode denial %+v", st)
				}
				return
			}
			if st.Code != http.StatusUnprocessableEntity || st.Reason != metav1.StatusReasonInvalid {
				t.Errorf("code %d reason %s, want 422 Invalid", st.Code, st.Reason)
			}
			var got []string
			for _, c := range st.Details.Causes {
				got = append(got, c.Field+": "+c.Message)
				if !strings.Contains(st.Message, c.Field+": "+c.Message) {
					t.Errorf("message %q does not hold the cause %s: %s", st.Message, c.Field, c.Message)
				}
			}
			if len(got) != len(tc.causes) {
				t.Fatalf("causes %q, want %q", got, tc.causes)
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tc.causes[i]) {
					t.Errorf("cause %q, want %q...", got[i], tc.causes[i])
				}
			}
		})
	}
}

// TestSameRefusalAsTheLoad holds the webhook to the Kubernetes source's
// load: a policy the load refuses is denied with the load's message, cause
// by cause. The bad provider is refused by the engine's check, not the
// parser's, so the webhook must run the engine's per-policy check.
func TestSameRefusalAsTheLoad(t *testing.T) {
	for _, doc := range []string{badProvider, strings.Replace(jwt, "v1beta1", "v1", 1)} {
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		var obj securityv1.AuthorizationPolicy
		if err := json.Unmarshal(js, &obj); err != nil {
			t.Fatal(err)
		}
		_, loadErr := kube.ConvertV1(&obj)
		if loadErr == nil {
			t.Fatalf("%s: the load accepts it", obj.Name)
		}
		resp, _ := admission.Review(request(t, admissionv1.Create, "authorizationpolicies", doc), nil)
		if resp.Allowed {
			t.Fatalf("%s: admitted; the load refuses it: %v", obj.Name, loadErr)
		}
		if resp.Result.Message != loadErr.Error() {
			t.Errorf("webhook says\n%s\nthe load says\n%s", resp.Result.Message, loadErr)
		}
		fes := admission.FieldErrors(loadErr)
		if len(fes) == 0 || len(fes) != len(resp.Result.Details.Causes) {
			t.Fatalf("causes %+v, load's field errors %v", resp.Result.Details.Causes, fes)
		}
		for i, fe := range fes {
			if c := resp.Result.Details.Causes[i]; c.Field != fe.Field || c.Message != fe.Err.Error() {
				t.Errorf("cause %+v, load's %s: %v", c, fe.Field, fe.Err)
			}
			if !errors.Is(fe, policy.ErrInvalid) && !errors.Is(fe, policy.ErrUnsupported) && !strings.Contains(fe.Error(), "provider") {
				t.Errorf("field error %v wraps no sentinel", fe)
			}
		}
	}
}

func TestRules(t *testing.T) {
	want := map[string][]string{
		"security.istio.io/authorizationpolicies": {"v1", "v1beta1"},
		"security.istio.io/peerauthentications":   {"v1", "v1beta1"},
		"networking.istio.io/serviceentries":      {"v1", "v1beta1", "v1alpha3"},
		"networking.istio.io/gateways":            {"v1", "v1beta1", "v1alpha3"},
		"networking.istio.io/virtualservices":     {"v1", "v1beta1", "v1alpha3"},
	}
	rules := admission.Rules()
	if len(rules) != len(want) {
		t.Fatalf("%d rules, want %d", len(rules), len(want))
	}
	for _, r := range rules {
		if v := want[r.Group+"/"+r.Resource]; !slices.Equal(r.Versions, v) {
			t.Errorf("%s/%s: versions %v, want %v", r.Group, r.Resource, r.Versions, v)
		}
		// Every listed version is validated, not waved through.
		for _, v := range r.Versions {
			req := request(t, admissionv1.Create, r.Resource, "apiVersion: "+r.Group+"/"+v+"\nkind: "+r.Kind+"\nmetadata: {name: x, namespace: ns}\nspec: 7\n")
			if resp, outcome := admission.Review(req, nil); resp.Allowed || outcome != admission.OutcomeError {
				t.Errorf("%s/%s %s: a spec that does not decode is %s", r.Group, v, r.Kind, outcome)
			}
		}
	}
	rules[0].Versions[0] = "mutated"
	if admission.Rules()[0].Versions[0] == "mutated" {
		t.Error("Rules shares its table with callers")
	}
}

func TestHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	h, err := admission.NewHandler(admission.HandlerConfig{Registerer: reg, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	post := func(contentType string, body []byte) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, admission.Path, bytes.NewReader(body))
		r.Header.Set("Content-Type", contentType)
		h.ServeHTTP(rec, r)
		return rec
	}
	review := func(req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
		t.Helper()
		body, _ := json.Marshal(admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"}, Request: req})
		rec := post("application/json", body)
		if rec.Code != http.StatusOK {
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
		var out admissionv1.AdmissionReview
		if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil {
			t.Fatalf("response %s: %v", rec.Body, err)
		}
		if out.APIVersion != "admission.k8s.io/v1" || out.Kind != "AdmissionReview" || out.Response.UID != req.UID {
			t.Fatalf("response %+v does not answer the review", out)
		}
		return out.Response
	}
	if resp := review(request(t, admissionv1.Create, "authorizationpolicies", badProvider)); resp.Allowed {
		t.Error("bad policy admitted")
	}
	resp := review(request(t, admissionv1.Create, "peerauthentications", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: b}\nspec: {mtls: {mode: DISABLE}}\n"))
	if !resp.Allowed || len(resp.Warnings) != 1 {
		t.Errorf("PeerAuthentication DISABLE: %+v", resp)
	}
	review(request(t, admissionv1.Create, "requestauthentications", "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a, namespace: b}\n"))

	if rec := post("text/plain", []byte("{}")); rec.Code != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain: %d", rec.Code)
	}
	if rec := post("application/json", []byte(`{"kind":"AdmissionReview"}`)); rec.Code != http.StatusBadRequest {
		t.Errorf("review without request: %d", rec.Code)
	}
	if rec := post("application/json", bytes.Repeat([]byte(" "), 9<<20)); rec.Code != http.StatusRequestEntityTooLarge {
		t.Errorf("9 MiB body: %d", rec.Code)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, admission.Path, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("GET: %d", rec.Code)
	}

	for _, c := range []struct {
		kind, outcome string
		want          float64
	}{
		{"AuthorizationPolicy", admission.OutcomeDenied, 1},
		{"AuthorizationPolicy", admission.OutcomeAllowed, 0},
		{"PeerAuthentication", admission.OutcomeWarned, 1},
		{"other", admission.OutcomeAllowed, 1},
		{"other", admission.OutcomeError, 3},
	} {
		got, err := reviews(reg, c.kind, c.outcome)
		if err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("reviews{kind=%s,outcome=%s} = %v, want %v", c.kind, c.outcome, got, c.want)
		}
	}
}

// reviews is one series of trustmesh_admission_reviews_total, read back
// from the registry; an absent series is an error.
func reviews(reg *prometheus.Registry, kind, outcome string) (float64, error) {
	mfs, err := reg.Gather()
	if err != nil {
		return 0, err
	}
	for _, mf := range mfs {
		if mf.GetName() != "trustmesh_admission_reviews_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["kind"] == kind && labels["outcome"] == outcome {
				return m.GetCounter().GetValue(), nil
			}
		}
	}
	return 0, fmt.Errorf("no series trustmesh_admission_reviews_total{kind=%q,outcome=%q}", kind, outcome)
}

func TestFieldErrors(t *testing.T) {
	a := &policy.FieldError{Field: "a", Err: policy.ErrInvalid}
	b := &policy.FieldError{Field: "b", Err: policy.ErrUnsupported}
	c := &policy.FieldError{Field: "c", Err: policy.ErrInvalid}
	err := fmt.Errorf("outer: %w", errors.Join(a, fmt.Errorf("mid: %w; %w", b, errors.New("plain")), c))
	var got []string
	for _, fe := range admission.FieldErrors(err) {
		got = append(got, fe.Field)
	}
	if !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("fields %q, want a, b, c", got)
	}
}

// TestReviewProviders holds a CUSTOM policy to the bundles the control
// plane serves, through the set in force (engine.Set.CheckProvider): one
// whose provider no bundle defines is refused as the load refuses the
// whole set with it, one a bundle defines is admitted, and a check that
// cannot be made now is an error, not an admission.
func TestReviewProviders(t *testing.T) {
	ctx := context.Background()
	b, err := source.LoadBundle(source.BundleConfig{Path: "../policies/envoy"})
	if err != nil {
		t.Fatal(err)
	}
	bundles := []engine.NamedBundle{{Name: "policies/envoy", Bundle: b}}
	set, err := engine.Build(ctx, engine.SetConfig{Bundles: bundles})
	if err != nil {
		t.Fatal(err)
	}
	custom := func(provider string) string {
		return strings.Replace(badProvider, "{name: opa}", "{name: \""+provider+"\"}", 1)
	}
	for _, tc := range []struct {
		provider  string
		providers admission.Providers
		outcome   string
	}{
		{"rego:envoy/authz/allow", set.CheckProvider, admission.OutcomeAllowed},
		{"rego:nowhere/allow", set.CheckProvider, admission.OutcomeDenied},
		{"rego:envoy/authz/allow", nil, admission.OutcomeDenied},
		{"rego:envoy/authz/allow", func(*policy.Policy) error { return errors.New("no policy set loaded yet") }, admission.OutcomeUnavailable},
	} {
		req := request(t, admissionv1.Create, "authorizationpolicies", custom(tc.provider))
		resp, outcome := admission.Review(req, tc.providers)
		if outcome != tc.outcome || resp.Allowed != (tc.outcome == admission.OutcomeAllowed) {
			t.Fatalf("%s (providers set %v): outcome %s allowed %v, want %s (%+v)", tc.provider, tc.providers != nil, outcome, resp.Allowed, tc.outcome, resp.Result)
		}
		if outcome == admission.OutcomeUnavailable {
			if resp.Result.Code != http.StatusServiceUnavailable || !strings.Contains(resp.Result.Message, "no policy set loaded yet") {
				t.Errorf("%+v, want 503 saying why", resp.Result)
			}
			continue
		}
		if outcome != admission.OutcomeDenied {
			continue
		}
		// The load of a set holding it refuses with the very error.
		js, _ := yaml.YAMLToJSON([]byte(custom(tc.provider)))
		var obj securityv1.AuthorizationPolicy
		if err := json.Unmarshal(js, &obj); err != nil {
			t.Fatal(err)
		}
		p, err := kube.ConvertV1(&obj)
		if err != nil {
			t.Fatal(err)
		}
		var loadBundles []engine.NamedBundle
		if tc.providers != nil {
			loadBundles = bundles
		}
		_, loadErr := engine.Build(ctx, engine.SetConfig{Policies: []*policy.Policy{p}, Bundles: loadBundles})
		st := resp.Result
		if loadErr == nil || st.Message != loadErr.Error() || st.Code != http.StatusUnprocessableEntity || st.Details == nil ||
			len(st.Details.Causes) != 1 || st.Details.Causes[0].Field != "spec.provider.name" {
			t.Errorf("%s: denial %+v\nwant the load's refusal as field spec.provider.name: %v", tc.provider, st, loadErr)
		}
	}
}

// TestConcurrentReviewsBounded holds the handler to MaxConcurrentReviews:
// while that many reviews run, another waits until its timeout (the
// apiserver's timeout parameter, or its context) and is refused with 429,
// which the apiserver resolves by the failurePolicy, and counted as busy;
// once a review finishes, the next one runs.
func TestConcurrentReviewsBounded(t *testing.T) {
	reg := prometheus.NewRegistry()
	entered, release := make(chan struct{}, 4), make(chan struct{})
	h, err := admission.NewHandler(admission.HandlerConfig{Registerer: reg, Log: slog.New(slog.DiscardHandler), MaxConcurrentReviews: 1,
		Providers: func(*policy.Policy) error { // a review that takes as long as the test wants
			entered <- struct{}{}
			select {
			case <-release:
			case <-time.After(3 * time.Second): // an unbounded handler fails the test, not hangs it
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request:  request(t, admissionv1.Create, "authorizationpolicies", strings.Replace(badProvider, "{name: opa}", `{name: "rego:envoy/authz/allow"}`, 1))})
	post := func(ctx context.Context, query string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		r := httptest.NewRequestWithContext(ctx, http.MethodPost, admission.Path+query, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		h.ServeHTTP(rec, r)
		return rec
	}
	first := make(chan *httptest.ResponseRecorder)
	go func() { first <- post(context.Background(), "") }()
	<-entered

	start := time.Now()
	if rec := post(context.Background(), "?timeout=200ms"); rec.Code != http.StatusTooManyRequests {
		t.Errorf("a review beyond the bound: %d %s, want 429", rec.Code, rec.Body)
	}
	if took := time.Since(start); took < 200*time.Millisecond || took > 5*time.Second {
		t.Errorf("refused after %v, want after its 200ms timeout", took)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if rec := post(ctx, ""); rec.Code != http.StatusTooManyRequests {
		t.Errorf("a review whose caller gives up: %d, want 429", rec.Code)
	}
	if n, err := reviews(reg, "other", admission.OutcomeBusy); err != nil || n != 2 {
		t.Errorf("busy reviews counted %v (%v), want 2", n, err)
	}

	close(release) // the running review finishes, and the next one runs
	if rec := <-first; rec.Code != http.StatusOK {
		t.Errorf("the running review: %d %s", rec.Code, rec.Body)
	}
	if rec := post(context.Background(), "?timeout=10s"); rec.Code != http.StatusOK {
		t.Errorf("a review once the slot is free: %d %s", rec.Code, rec.Body)
	}
	if d := admission.DefaultMaxConcurrentReviews(); d < 1 || d > max(1, goruntime.GOMAXPROCS(0)/2) {
		t.Errorf("default bound %d", d)
	}
}
