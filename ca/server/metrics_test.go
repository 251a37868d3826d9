package server_test

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/server"
)

// scrape is /metrics as Prometheus reads it: each sample, by its name and
// labels as written, and each family's TYPE.
type scrape struct {
	samples map[string]float64
	types   map[string]string
}

func scrapeMetrics(t *testing.T, reg prometheus.Gatherer) scrape {
	t.Helper()
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	s := scrape{samples: map[string]float64{}, types: map[string]string{}}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			s.types[name] = typ
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		s.samples[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestIstioMetricNames: /metrics carries the CA's events under istiod's
// names, which Istio's dashboards and alerts query, beside trustmesh's own,
// and both move together: on an issuance, on each kind of refusal, and on
// rotation for the expiry gauges, which equal the certificates' NotAfter.
func TestIstioMetricNames(t *testing.T) {
	f := newFixture(t)
	client := pb.NewIstioCertificateServiceClient(f.conn(t, nil))

	type want map[string]float64
	check := func(step string, w want) {
		t.Helper()
		s := scrapeMetrics(t, f.reg)
		for name, v := range w {
			if got, ok := s.samples[name]; !ok || got != v {
				t.Errorf("%s: %s = %v (exported %v), want %v", step, name, got, ok, v)
			}
		}
	}
	counts := func(csr, success, authn, parsing, id float64) want {
		return want{
			"citadel_server_csr_count":                    csr,
			"citadel_server_success_cert_issuance_count":  success,
			"citadel_server_authentication_failure_count": authn,
			"citadel_server_csr_parsing_err_count":        parsing,
			"citadel_server_id_extraction_err_count":      id,
		}
	}
	expiry := func(m *authority.Material) want {
		return want{
			"citadel_server_root_cert_expiry_timestamp":  float64(m.Anchor.NotAfter.Unix()),
			"citadel_server_cert_chain_expiry_timestamp": float64(m.Cert.NotAfter.Unix()),
		}
	}

	check("at start", counts(0, 0, 0, 0, 0))
	check("at start", expiry(f.auth.Current()))
	types := scrapeMetrics(t, f.reg).types
	for name, typ := range map[string]string{
		"citadel_server_csr_count":                    "counter",
		"citadel_server_success_cert_issuance_count":  "counter",
		"citadel_server_authentication_failure_count": "counter",
		"citadel_server_csr_parsing_err_count":        "counter",
		"citadel_server_id_extraction_err_count":      "counter",
		"citadel_server_csr_sign_err_count":           "counter",
		"citadel_server_root_cert_expiry_timestamp":   "gauge",
		"citadel_server_cert_chain_expiry_timestamp":  "gauge",
	} {
		if types[name] != typ {
			t.Errorf("%s has TYPE %q, want %q", name, types[name], typ)
		}
	}

	if _, err := client.CreateCertificate(bearer(f.joinToken(t, alice)), &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t))}); err != nil {
		t.Fatal(err)
	}
	w := counts(1, 1, 0, 0, 0)
	w[`trustmesh_ca_issued_total{method="join-token"}`] = 1
	check("after an issuance", w)

	refuse := func(ctx context.Context, csr string) {
		t.Helper()
		if _, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr}); err == nil {
			t.Fatal("CreateCertificate succeeded, want a refusal")
		}
	}
	refuse(context.Background(), makeCSR(t, newKey(t)))
	w = counts(2, 1, 1, 0, 0)
	w[`trustmesh_ca_refused_total{code="Unauthenticated",reason="no-credentials"}`] = 1
	check("after an unauthenticated request", w)

	refuse(bearer(f.joinToken(t, alice)), "hello")
	w = counts(3, 1, 1, 1, 0)
	w[`trustmesh_ca_refused_total{code="InvalidArgument",reason="csr-malformed"}`] = 1
	check("after a malformed CSR", w)

	refuse(bearer(f.joinToken(t, alice)), makeCSR(t, newKey(t), bob))
	w = counts(4, 1, 1, 1, 1)
	w[`trustmesh_ca_refused_total{code="InvalidArgument",reason="csr-identity"}`] = 1
	check("after a CSR for another identity", w)

	next := rotate(t, f)
	check("after rotation", expiry(next))
}

// TestIstioRefusalCounters: every refusal counts under exactly one of
// istiod's failure counters, the one istiod counts the same failure under.
func TestIstioRefusalCounters(t *testing.T) {
	detail := errors.New("detail")
	tests := []struct {
		err    error
		metric string
	}{
		{ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenUsed, detail), "citadel_server_authentication_failure_count"},
		{ca.Refuse(ca.KindDenied, ca.ReasonEnrolmentRevoked, detail), "citadel_server_authentication_failure_count"},
		{ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewFailed, detail), "citadel_server_authentication_failure_count"},
		{ca.Refuse(ca.KindInvalid, ca.ReasonCSRSignature, detail), "citadel_server_csr_parsing_err_count"},
		{ca.Refuse(ca.KindInvalid, ca.ReasonCSRKey, detail), "citadel_server_csr_parsing_err_count"},
		{ca.Refuse(ca.KindInvalid, ca.ReasonCSRIdentity, detail), "citadel_server_id_extraction_err_count"},
		{ca.Refuse(ca.KindUnavailable, ca.ReasonJournalTampered, detail), `citadel_server_csr_sign_err_count{error="CANotReady"}`},
		{ca.Refuse(ca.KindInternal, ca.ReasonRecordFailed, detail), `citadel_server_csr_sign_err_count{error="CertGenError"}`},
		{errors.New("not a refusal"), `citadel_server_csr_sign_err_count{error="CertGenError"}`},
	}
	failures := []string{
		"citadel_server_authentication_failure_count", "citadel_server_csr_parsing_err_count",
		"citadel_server_id_extraction_err_count", `citadel_server_csr_sign_err_count{error="CANotReady"}`,
		`citadel_server_csr_sign_err_count{error="CertGenError"}`,
	}
	for _, tc := range tests {
		t.Run(tc.metric+" "+tc.err.Error(), func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m, err := authority.Generate(context.Background(), td, time.Now(), 0)
			if err != nil {
				t.Fatal(err)
			}
			svc := server.NewCertificateService(server.CertificateServiceConfig{
				Issuer:        issuerFunc(func() (*ca.Issued, error) { return nil, tc.err }),
				Authenticator: fixedAuthenticator{ca.Caller{ID: alice, Method: "join-token", Subject: "join-token:0011"}},
				Refusals:      &refusalRecorder{},
				Metrics:       server.NewMetrics(reg, func() *authority.Material { return m }),
				Clock:         clocktesting.NewFakeClock(time.Now()),
			})
			if _, err := svc.CreateCertificate(metadata.NewIncomingContext(context.Background(), nil), &pb.IstioCertificateRequest{Csr: "x"}); err == nil {
				t.Fatal("CreateCertificate succeeded")
			}
			s := scrapeMetrics(t, reg)
			if v := s.samples["citadel_server_csr_count"]; v != 1 {
				t.Errorf("citadel_server_csr_count = %v, want 1", v)
			}
			if v := s.samples["citadel_server_success_cert_issuance_count"]; v != 0 {
				t.Errorf("citadel_server_success_cert_issuance_count = %v, want 0", v)
			}
			for _, name := range failures {
				want := 0.0
				if name == tc.metric {
					want = 1
				}
				if v := s.samples[name]; v != want {
					t.Errorf("%s = %v, want %v", name, v, want)
				}
			}
		})
	}
}
