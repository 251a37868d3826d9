package cabundle_test

import (
	"context"
	"encoding/json"
	pemlib "encoding/pem"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/trustmesh/trustmesh/injector/cabundle"
)

// The probe's token travels in this annotation in these tests; the control
// plane uses admission.ProbeAnnotation.
const (
	probeAnnotation = "example.com/probe-token"
	probeToken      = "3b9f1c0d2e7a4f65"
)

// Webhook names are unique only within a configuration. Another
// configuration's webhook of the same name (another release's, in the
// chart before each release named its own) that works and denies the
// probe is not ours answering: our configuration, whose webhook nobody
// serves, stays Ignore, and the probe's failure says why without the
// token. Before the probe carried a token, it was switched to Fail (found
// in review; this was the reviewer's repro).
func TestProbeNotAnsweredByAnotherConfiguration(t *testing.T) {
	cs := kube(t)
	dyn := dynamic.NewForConfigOrDie(shared.Config(t))
	ctx := context.Background()
	// The other webhook denies everything, quoting nothing of the object.
	deny := func(w http.ResponseWriter, r *http.Request) {
		var review admissionv1.AdmissionReview
		_ = json.NewDecoder(r.Body).Decode(&review)
		review.Response = &admissionv1.AdmissionResponse{UID: review.Request.UID, Allowed: false, Result: &metav1.Status{Message: "other release refused"}}
		review.Request = nil
		_ = json.NewEncoder(w).Encode(review)
	}
	other := httptest.NewTLSServer(http.HandlerFunc(deny))
	t.Cleanup(other.Close)
	api := apis(cs)[1]
	sel := &metav1.LabelSelector{MatchLabels: map[string]string{"probe": "spoof"}}
	hooks := []string{"validation.trustmesh.io"}
	// The other configuration, working, with its own caBundle.
	if err := api.create(ctx, "spoof-other", other.URL+"/validate", hooks, admissionregistrationv1.Fail, sel); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.delete(context.Background(), "spoof-other") })
	vwcs := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	o, err := vwcs.Get(ctx, "spoof-other", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o.Webhooks[0].ClientConfig.CABundle = pemlib.EncodeToMemory(&pemlib.Block{Type: "CERTIFICATE", Bytes: other.Certificate().Raw})
	if _, err := vwcs.Update(ctx, o, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Ours: nobody listens.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "https://" + lis.Addr().String() + "/validate"
	lis.Close()
	w, err := api.watch(ctx, "spoof-ours")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	if err := api.create(ctx, "spoof-ours", dead, hooks, admissionregistrationv1.Ignore, sel); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.delete(context.Background(), "spoof-ours") })
	b := spiffebundle.New(td)
	b.AddX509Authority(other.Certificate()) // any bundle
	pem, err := cabundle.PEM(b)
	if err != nil {
		t.Fatal(err)
	}
	probe := &unstructured.Unstructured{}
	probe.SetAPIVersion("v1")
	probe.SetKind("ConfigMap")
	probe.SetName("probe")
	probe.SetNamespace("default")
	probe.SetLabels(map[string]string{"probe": "spoof"})
	probe.SetAnnotations(map[string]string{probeAnnotation: probeToken})
	logs := make(logSink, 100)
	p, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{
		Client: cs, Kind: cabundle.Validating, Name: "spoof-ours", Bundle: staticBundle{b},
		FailClose: &cabundle.Probe{Client: dyn, Resource: schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, Object: probe, Token: probeToken},
		Log:       slog.New(logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	run(t, p.Run)
	awaitState(t, api, w, "the bundle", string(pem), "", nil)
	for failures := 0; failures < 2; {
		select {
		case msg := <-logs:
			if strings.Contains(msg, "failurePolicy stays Ignore") && strings.Contains(msg, "not by this process's webhook") {
				if strings.Contains(msg, probeToken) {
					t.Errorf("the log quotes the probe token: %s", msg)
				}
				failures++
			}
		case <-time.After(40 * time.Second):
			t.Fatal("timed out waiting for the probe's failures to be logged")
		}
	}
	obj, _, err := api.get(ctx, "spoof-ours")
	if err != nil {
		t.Fatal(err)
	}
	if _, policies, _ := api.state(obj); len(policies) != 1 || policies[0] != string(admissionregistrationv1.Ignore) {
		t.Errorf("failurePolicy %v after another configuration's denial, want Ignore: our webhook never answered", policies)
	}
}
