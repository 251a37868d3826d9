package admission_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"istio.io/client-go/pkg/clientset/versioned"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// serverReadTimeout is the control plane's server ReadTimeout
// (internal/connlimit): what bounded a slow body before it had its own
// deadline.
const serverReadTimeout = 30 * time.Second

// holdBody opens a connection to addr (TLS if tlsConf is set) that sends a
// review's headers and one byte of its 1 MB body, and nothing more.
func holdBody(t *testing.T, addr string, tlsConf *tls.Config) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	if tlsConf != nil {
		c, err = tls.Dial("tcp", addr, tlsConf)
	} else {
		c, err = net.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{", admission.Path)
	return c
}

// TestSlowBodyHoldsNoSlot: clients that send their bodies slowly, as many
// as there are review slots, hold none: a real review still runs at once,
// and each slow client is cut off after the body's own read deadline,
// long before the server's ReadTimeout.
func TestSlowBodyHoldsNoSlot(t *testing.T) {
	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ReadTimeout = serverReadTimeout
	srv.Start()
	defer srv.Close()
	opened := time.Now()
	var slow []net.Conn
	for range admission.DefaultMaxConcurrentReviews() {
		slow = append(slow, holdBody(t, srv.Listener.Addr().String(), nil))
	}
	time.Sleep(200 * time.Millisecond)

	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: request(t, admissionv1.Create, "authorizationpolicies",
			"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {action: DENY, rules: [{from: [{source: {principals: ['a*b']}}]}]}\n")})
	start := time.Now()
	resp, err := http.Post(srv.URL+admission.Path+"?timeout=3s", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var review admissionv1.AdmissionReview
	if resp.StatusCode != http.StatusOK || json.Unmarshal(out, &review) != nil || review.Response == nil || review.Response.Allowed {
		t.Fatalf("a real review while slow clients send: HTTP %d after %v: %s; want its denial", resp.StatusCode, time.Since(start), out)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("a real review took %v while slow clients send, want it at once", took)
	}

	for _, c := range slow {
		_ = c.SetReadDeadline(time.Now().Add(serverReadTimeout))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		took := time.Since(opened)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("a slow body was answered %d", resp.StatusCode)
			}
		}
		if took > 3*time.Second+8*time.Second { // the body's deadline, with room for 2 loaded cores
			t.Errorf("a slow client was cut off after %v (%v), want after the body's own deadline", took, err)
		}
	}
}

// TestNotLoadedIsACallFailure: a review the webhook cannot check now (no
// policy set loaded yet) is answered with HTTP 503 and no AdmissionReview,
// a call failure the failurePolicy resolves, not an allowed=false the
// apiserver would enforce under any failurePolicy; it is counted as
// unavailable.
func TestNotLoadedIsACallFailure(t *testing.T) {
	reg := prometheus.NewRegistry()
	notLoaded := func(*policy.Policy) error { return errors.New("controlplane: no policy set loaded yet") }
	h, err := admission.NewHandler(admission.HandlerConfig{Registerer: reg, Log: slog.New(slog.DiscardHandler), Providers: notLoaded})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: request(t, admissionv1.Create, "authorizationpolicies",
			"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {action: CUSTOM, provider: {name: 'rego:authz/allow'}, rules: [{}]}\n")})
	rec := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodPost, admission.Path, bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	h.ServeHTTP(rec, r)
	// Without Retry-After: with it the apiserver retries until the
	// webhook's timeout, and only then applies the failurePolicy.
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "no policy set loaded yet") || rec.Header().Get("Retry-After") != "" {
		t.Errorf("HTTP %d %q (Retry-After %q), want 503 saying why, without Retry-After", rec.Code, rec.Body, rec.Header().Get("Retry-After"))
	}
	if n, err := reviews(reg, "AuthorizationPolicy", admission.OutcomeUnavailable); err != nil || n != 1 {
		t.Errorf("unavailable reviews counted %v (%v), want 1", n, err)
	}
}

// webhookServer serves h over TLS and registers it in the apiserver with
// failurePolicy fp, returning the configuration's client and name.
func webhookServer(t *testing.T, cs kubernetes.Interface, name string, h http.Handler, fp admissionregistrationv1.FailurePolicyType) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ReadTimeout = serverReadTimeout
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caBundle := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	vwcs := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	if _, err := vwcs.Create(context.Background(), webhookConfig(name, srv.URL+admission.Path, caBundle, fp), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = vwcs.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	return srv
}

// TestSlowBodyUnderIgnore: in a real apiserver with failurePolicy Ignore
// (the chart's default for one replica), a client that holds a connection
// with a slow body does not get a policy the engine refuses stored past
// the webhook: the review still runs, and denies it.
func TestSlowBodyUnderIgnore(t *testing.T) {
	cfg := apiserver.Config(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "slow-body"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler), MaxConcurrentReviews: 1})
	if err != nil {
		t.Fatal(err)
	}
	srv := webhookServer(t, cs, "slow-body", h, admissionregistrationv1.Ignore)
	aps := versioned.NewForConfigOrDie(cfg).SecurityV1().AuthorizationPolicies("slow-body")
	waitUntil(t, "the webhook is called", func() bool {
		_, err := aps.Create(ctx, jwtPolicy("slow-body", "probe"), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err != nil && strings.Contains(err.Error(), deniedBy)
	})
	u, _ := url.Parse(srv.URL)
	holdBody(t, u.Host, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	time.Sleep(300 * time.Millisecond)
	_, err = aps.Create(ctx, jwtPolicy("slow-body", "stored"), metav1.CreateOptions{})
	if st := denial(t, err); !strings.Contains(st.Message, deniedBy) {
		t.Errorf("create of a policy the engine refuses while a slow body is sent: %v, want the webhook's denial", err)
	}
}

// TestNotLoadedFailurePolicyDecides: in a real apiserver, before the first
// policy set loads, a CUSTOM policy is admitted unchecked under Ignore
// (the load checks it) and refused as a failed call under Fail; it is
// never the webhook's denial.
func TestNotLoadedFailurePolicyDecides(t *testing.T) {
	cfg := apiserver.Config(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "not-loaded"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	notLoaded := func(*policy.Policy) error {
		return errors.New("controlplane: no policy set loaded yet, so the Rego bundles of CUSTOM providers are not known")
	}
	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler), Providers: notLoaded})
	if err != nil {
		t.Fatal(err)
	}
	webhookServer(t, cs, "not-loaded", h, admissionregistrationv1.Ignore)
	aps := versioned.NewForConfigOrDie(cfg).SecurityV1().AuthorizationPolicies("not-loaded")
	waitUntil(t, "the webhook is called", func() bool {
		_, err := aps.Create(ctx, jwtPolicy("not-loaded", "probe"), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err != nil && strings.Contains(err.Error(), deniedBy)
	})
	custom := func(name string) *securityv1.AuthorizationPolicy {
		p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "not-loaded", Name: name}}
		p.Spec.Action = apisecurity.AuthorizationPolicy_CUSTOM
		p.Spec.ActionDetail = &apisecurity.AuthorizationPolicy_Provider{Provider: &apisecurity.AuthorizationPolicy_ExtensionProvider{Name: "rego:authz/allow"}}
		p.Spec.Rules = []*apisecurity.Rule{{}}
		return p
	}
	start := time.Now()
	if _, err := aps.Create(ctx, custom("ignore"), metav1.CreateOptions{}); err != nil {
		t.Errorf("CUSTOM create under Ignore before the first load: %v, want it admitted", err)
	}
	if took := time.Since(start); took > 3*time.Second { // the webhook's timeout is 5s
		t.Errorf("CUSTOM create under Ignore took %v, want it admitted at once, not at the webhook's timeout", took)
	}

	vwcs := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	vwc, err := vwcs.Get(ctx, "not-loaded", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fail := admissionregistrationv1.Fail
	vwc.Webhooks[0].FailurePolicy = &fail
	if _, err := vwcs.Update(ctx, vwc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "Fail is in force", func() bool {
		_, err := aps.Create(ctx, custom("fail"), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err != nil
	})
	_, err = aps.Create(ctx, custom("fail"), metav1.CreateOptions{})
	if err == nil || strings.Contains(err.Error(), deniedBy) || !strings.Contains(err.Error(), "failed calling webhook") ||
		!strings.Contains(err.Error(), "no policy set loaded yet") {
		t.Errorf("CUSTOM create under Fail before the first load: %v, want a failed call saying why", err)
	}
}
