package controlplane

import (
	"cmp"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	"github.com/trustmesh/trustmesh/injector/webhook"
)

// AdmissionConfig configures the validating admission webhook, which
// refuses at `kubectl apply` what the engine would refuse at load.
type AdmissionConfig struct {
	// WebhookConfig names the ValidatingWebhookConfiguration whose caBundle
	// the control plane keeps current across CA rotation, and whose
	// failurePolicy it switches from Ignore to Fail once the webhook is
	// seen denying a dry-run invalid AuthorizationPolicy.
	WebhookConfig string
	// KeepIgnore leaves the failurePolicy as installed (Ignore): the
	// caBundle is still kept current, but a webhook that is not highly
	// available does not hold up every write of the kinds it checks while
	// it is down. Invalid policies are still refused at load, which keeps
	// the last good set.
	KeepIgnore bool
}

// ValidationWebhookOff, as WebhookConfig, keeps no
// ValidatingWebhookConfiguration: /validate is still served, for a
// configuration that someone else keeps.
const ValidationWebhookOff = "off"

// DefaultValidationWebhook is the ValidatingWebhookConfiguration's name.
const DefaultValidationWebhook = "trustmesh-validator"

func (c *AdmissionConfig) setDefaults() {
	if c.WebhookConfig == "" {
		c.WebhookConfig = DefaultValidationWebhook
	}
}

// ProbeName is the dry-run AuthorizationPolicy that shows the webhook
// answering; it is never stored.
const ProbeName = "trustmesh-validation-probe"

// probePolicy is an AuthorizationPolicy that the CRD schema admits and the
// engine refuses (a '*' inside a principal), in the policy root namespace,
// which exists wherever policies are read from and is not one the
// webhook's namespaceSelector leaves out.
// It carries the process's probe token, which only this process's webhook
// answers (admission.HandlerConfig.ProbeToken).
func probePolicy(namespace, token string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1",
		"kind":       "AuthorizationPolicy",
		"metadata": map[string]any{"name": ProbeName, "namespace": namespace,
			"annotations": map[string]any{admission.ProbeAnnotation: token}},
		"spec": map[string]any{
			"action": "DENY",
			"rules": []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{
				"principals": []any{"trustmesh*validation-probe"},
			}}}}},
		},
	}}
}

// newWebhooks assembles the admission webhooks on Kubernetes: one TLS
// server with the control plane's own certificate, as istiod serves both
// on 15017, with sidecar injection at /inject (unless injection is off)
// and config validation at /validate (always: turning injection off must
// not turn validation off). The control plane keeps both webhook
// configurations' caBundle current across rotation.
func (cp *ControlPlane) newWebhooks(v *validated) error {
	if !v.injectorOn() {
		return nil
	}
	mux := http.NewServeMux()
	if !v.Injector.Disabled {
		h, err := cp.newInjector(v)
		if err != nil {
			return err
		}
		mux.Handle(webhook.Path, h)
	}
	h, err := cp.newValidator(v)
	if err != nil {
		return err
	}
	mux.Handle(admission.Path, h)
	// The port bindAll bound is handed over, not released and bound
	// again, which would let another process take it in between.
	if cp.webhooks, err = webhook.New(webhook.Config{
		Address: v.Listen.Injector, Listener: cp.reserved["listen-injector"], Handler: mux,
		GetCertificate: cp.serving.GetCertificate, Connections: v.Listen.Connections, Log: v.Log,
	}); err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	delete(cp.reserved, "listen-injector") // the webhook server's now
	return nil
}

// newValidator assembles the validating webhook's handler and the patcher
// that keeps its ValidatingWebhookConfiguration current.
func (cp *ControlPlane) newValidator(v *validated) (http.Handler, error) {
	// The probe token is this process's: with several replicas behind one
	// Service, each switches only once its own webhook is seen answering.
	var secret [16]byte
	if _, err := rand.Read(secret[:]); err != nil {
		return nil, fmt.Errorf("controlplane: probe token: %w", err)
	}
	token := hex.EncodeToString(secret[:])
	host, _ := os.Hostname()
	h, err := admission.NewHandler(admission.HandlerConfig{Registerer: cp.registry, Log: v.Log,
		ProbeToken: token, ProbeIdentity: "trustmesh " + cmp.Or(host, "control plane"), Providers: cp.providers()})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	if v.Admission.WebhookConfig == ValidationWebhookOff {
		return h, nil
	}
	var failClose *cabundle.Probe
	if !v.Admission.KeepIgnore {
		dyn, err := dynamic.NewForConfigAndClient(cp.cluster.rest, cp.cluster.http)
		if err != nil {
			return nil, fmt.Errorf("controlplane: Kubernetes dynamic client: %w", err)
		}
		failClose = &cabundle.Probe{
			Client:   dyn,
			Resource: schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"},
			Object:   probePolicy(cmp.Or(v.Authz.RootNamespace, engine.DefaultRootNamespace), token),
			Token:    token,
		}
	}
	patcher, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{
		Client: cp.cluster.kube, Kind: cabundle.Validating, Name: v.Admission.WebhookConfig, Bundle: cp.authority, Log: v.Log,
		FailClose: failClose,
	})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	cp.bundleFns = append(cp.bundleFns, patcher.Run)
	return h, nil
}

// providers is the webhook's check of a CUSTOM policy's provider: the
// check engine.Build makes, against the bundles of the policy set the
// authorization service serves, so the webhook refuses what the next load
// would refuse and follows the bundles as the loader reloads them. Before
// the first set is loaded it cannot check, and says so (failurePolicy
// decides). Without the authorization service no bundles are loaded and
// every CUSTOM policy is refused, as a load refuses it.
func (cp *ControlPlane) providers() admission.Providers {
	if cp.authz == nil {
		return nil
	}
	eng := cp.authz.Engine
	return func(p *policy.Policy) error {
		s := eng.Current()
		if s == nil {
			return errors.New("controlplane: no policy set loaded yet, so the Rego bundles of CUSTOM providers are not known")
		}
		return s.CheckProvider(p)
	}
}
