// Package admission is trustmesh's validating admission webhook: Galley's
// half of Istio, for the objects trustmesh reads. It runs the checks the
// control plane runs when it loads an object, the same functions and not
// copies, so that kubectl apply refuses what the control plane would
// refuse:
//
//   - an AuthorizationPolicy is converted and checked by the Kubernetes
//     policy source's own per-object check (authz/source/kube.ConvertV1,
//     which ends in engine.CheckPolicy, which engine.Build makes too). One
//     refused policy would freeze the whole policy set at runtime, so a
//     refused policy is denied, naming each field and its reason;
//   - a PeerAuthentication that is not STRICT is admitted with a warning
//     (mesh.CheckPeerAuthentication): trustmesh never honours it, and
//     refusing it would break clusters that share it with Istio or migrate
//     from it;
//   - a ServiceEntry or Gateway the mesh model skips (a mesh.Refusal) is
//     admitted with a warning that trustmesh ignores it, and why; a
//     VirtualService is only decoded;
//   - an object that does not decode is denied; DELETE is always allowed,
//     and so are kinds trustmesh does not read.
//
// A CUSTOM policy is also held to the Rego bundles the control plane
// serves (Providers: engine.Set.CheckProvider of the set in force, the
// check engine.Build makes), and refused as field spec.provider.name when
// none defines its provider, as the load would refuse the whole set. What
// only a whole set can refuse is not checked: two policies of one
// namespace/name cannot exist in a cluster.
package admission

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"sync"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/meshcheck"
)

// Path is where the webhook is served: POST, an AdmissionReview of
// admission.k8s.io/v1.
const Path = "/validate"

// Rule is one resource the webhook validates, in every version the Istio
// CRDs serve.
type Rule struct {
	Group    string
	Versions []string
	// Resource is the plural resource name, e.g. "authorizationpolicies".
	Resource string
	Kind     string
}

// Operations are the operations the webhook configuration should send;
// the webhook allows every other one (DELETE always).
var Operations = []string{"CREATE", "UPDATE"}

// kind is one kind the webhook validates; check validates one object of
// a version, and is indexed by version.
type kind struct {
	Rule
	check map[string]func(raw []byte, ns string, providers Providers) verdict
}

// Providers checks a CUSTOM policy's provider against the Rego bundles the
// control plane serves: engine.Set.CheckProvider of the set in force,
// which refuses with a *policy.FieldError of spec.provider.name. Any other
// error (e.g. no set loaded yet) means it cannot check now: Review's
// outcome is OutcomeUnavailable, which the handler answers with HTTP 503
// and no AdmissionReview, a call failure the apiserver resolves by the
// failurePolicy (Fail refuses the write; Ignore admits the object
// unchecked, and the load still refuses it if it must). Nil means no
// bundles are loaded: every CUSTOM policy is refused, as a load refuses it.
type Providers func(*policy.Policy) error

// noBundles is the check of a control plane that loads no bundles.
var noBundles = sync.OnceValue(func() Providers {
	s, err := engine.Build(context.Background(), engine.SetConfig{})
	if err != nil {
		return func(*policy.Policy) error { return fmt.Errorf("admission: %w", err) }
	}
	return s.CheckProvider
})

// kinds is the table of what the webhook validates; Rules is its public
// view. The mesh kinds are meshcheck's, which trustmesh analyze -f
// dispatches through too.
var kinds = append([]kind{
	{Rule{"security.istio.io", []string{"v1", "v1beta1"}, "authorizationpolicies", "AuthorizationPolicy"},
		map[string]func([]byte, string, Providers) verdict{
			"v1":      checkAuthorizationPolicy(kube.ConvertV1, func(o *securityv1.AuthorizationPolicy) *metav1.ObjectMeta { return &o.ObjectMeta }),
			"v1beta1": checkAuthorizationPolicy(kube.ConvertV1beta1, func(o *securityv1beta1.AuthorizationPolicy) *metav1.ObjectMeta { return &o.ObjectMeta }),
		}},
}, meshKinds()...)

// meshKinds are meshcheck's kinds: an object that does not decode is
// denied, one the mesh refuses is admitted with a warning per refusal.
func meshKinds() []kind {
	var out []kind
	for _, mk := range meshcheck.Kinds {
		k := kind{Rule{mk.Group, mk.Versions, mk.Resource, mk.Kind}, map[string]func([]byte, string, Providers) verdict{}}
		for _, v := range mk.Versions {
			check := mk.Check(v)
			k.check[v] = func(raw []byte, ns string, _ Providers) verdict {
				refs, err := check(raw, ns)
				if err != nil {
					return verdict{err: fmt.Errorf("admission: %w", err), decode: true}
				}
				var out verdict
				for i := range refs {
					out.warnings = append(out.warnings, warning(&refs[i]))
				}
				return out
			}
		}
		out = append(out, k)
	}
	return out
}

// Rules returns every resource the webhook validates: the chart's
// ValidatingWebhookConfiguration must list exactly these.
func Rules() []Rule {
	out := make([]Rule, len(kinds))
	for i, k := range kinds {
		out[i] = k.Rule
		out[i].Versions = append([]string(nil), k.Versions...)
	}
	return out
}

// Outcomes of a review, the outcome label of
// trustmesh_admission_reviews_total.
const (
	OutcomeAllowed = "allowed"
	OutcomeDenied  = "denied"
	OutcomeWarned  = "warned"
	// OutcomeError is an object that does not decode; it is denied too.
	OutcomeError = "error"
	// OutcomeUnavailable is an object the webhook cannot check now (its
	// Providers failed other than by refusing the policy). The response
	// Review returns is a 503 denial; the handler answers HTTP 503
	// instead, so that the failurePolicy decides.
	OutcomeUnavailable = "unavailable"
)

// verdict is the result of checking one object.
type verdict struct {
	// err refuses the object: joined *policy.FieldErrors for a policy the
	// engine refuses, or a decode error (decode set).
	err    error
	decode bool
	// unavailable marks an object the webhook cannot check now.
	unavailable bool
	// warnings are refusals of the mesh model: the object is admitted, and
	// ignored by trustmesh.
	warnings []string
}

// Review validates one admission request, holding CUSTOM policies to
// providers. It returns the response (UID not set) and the outcome.
func Review(req *admissionv1.AdmissionRequest, providers Providers) (*admissionv1.AdmissionResponse, string) {
	if providers == nil {
		providers = noBundles()
	}
	allow := &admissionv1.AdmissionResponse{Allowed: true}
	if req.Operation != admissionv1.Create && req.Operation != admissionv1.Update || req.SubResource != "" {
		return allow, OutcomeAllowed
	}
	check := lookup(req.Resource)
	if check == nil {
		return allow, OutcomeAllowed
	}
	ns := req.Namespace
	if req.Operation == admissionv1.Update && terminatingMetadataOnly(req) {
		// An object being deleted is on its way out: refusing the update
		// that removes its last finalizer would keep it forever, even one
		// stored before the webhook ran. Only such metadata edits are let
		// through: the load still reads a terminating object, so a change
		// of what it enforces is checked as any update.
		return allow, OutcomeAllowed
	}
	v := check(req.Object.Raw, ns, providers)
	if v.err != nil {
		outcome := OutcomeDenied
		switch {
		case v.unavailable:
			outcome = OutcomeUnavailable
		case v.decode:
			outcome = OutcomeError
		}
		return &admissionv1.AdmissionResponse{Allowed: false, Result: status(req, v)}, outcome
	}
	if len(v.warnings) > 0 {
		return &admissionv1.AdmissionResponse{Allowed: true, Warnings: v.warnings}, OutcomeWarned
	}
	return allow, OutcomeAllowed
}

// objectView is what decides whether an update of a terminating object
// changes what trustmesh reads of it.
type objectView struct {
	Metadata struct {
		DeletionTimestamp *metav1.Time      `json:"deletionTimestamp"`
		Annotations       map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec any `json:"spec"`
}

// terminatingMetadataOnly reports whether an update is of an object being
// deleted and leaves its spec and its istio.io/dry-run annotation (what
// the load reads) as the old object has them.
func terminatingMetadataOnly(req *admissionv1.AdmissionRequest) bool {
	var obj, old objectView
	if json.Unmarshal(req.Object.Raw, &obj) != nil || obj.Metadata.DeletionTimestamp == nil ||
		json.Unmarshal(req.OldObject.Raw, &old) != nil || req.OldObject.Raw == nil {
		return false
	}
	dv, dok := obj.Metadata.Annotations[policy.DryRunAnnotation]
	ov, ook := old.Metadata.Annotations[policy.DryRunAnnotation]
	return dv == ov && dok == ook && reflect.DeepEqual(obj.Spec, old.Spec)
}

func lookup(r metav1.GroupVersionResource) func([]byte, string, Providers) verdict {
	for _, k := range kinds {
		if k.Group == r.Group && k.Resource == r.Resource {
			return k.check[r.Version]
		}
	}
	return nil
}

// kindOf names the kind of a resource for metrics: "other" when the
// webhook does not validate it.
func kindOf(r metav1.GroupVersionResource) string {
	for _, k := range kinds {
		if k.Group == r.Group && k.Resource == r.Resource {
			if _, ok := k.check[r.Version]; ok {
				return k.Kind
			}
		}
	}
	return "other"
}

// MaxCauses bounds the refused fields one denial lists; it says how many
// more there are.
const MaxCauses = 20

// status is the denial of an object: 422 Invalid with a cause per refused
// field for a refusal, 400 BadRequest for an object that does not decode.
func status(req *admissionv1.AdmissionRequest, v verdict) *metav1.Status {
	st := &metav1.Status{
		Status:  metav1.StatusFailure,
		Message: v.err.Error(),
		Details: &metav1.StatusDetails{Name: req.Name, Group: req.Kind.Group, Kind: req.Kind.Kind},
	}
	if v.decode {
		st.Code, st.Reason = http.StatusBadRequest, metav1.StatusReasonBadRequest
		return st
	}
	if v.unavailable {
		st.Code, st.Reason = http.StatusServiceUnavailable, metav1.StatusReasonServiceUnavailable
		return st
	}
	st.Code, st.Reason = http.StatusUnprocessableEntity, metav1.StatusReasonInvalid
	fes, more := FieldErrors(v.err), ""
	if len(fes) > MaxCauses {
		// The apiserver relays the denial to the client: keep it short.
		msgs := make([]string, 0, MaxCauses+1)
		for _, fe := range fes[:MaxCauses] {
			msgs = append(msgs, fe.Error())
		}
		more = fmt.Sprintf("and %d more", len(fes)-MaxCauses)
		st.Message = strings.Join(append(msgs, more), "\n")
		fes = fes[:MaxCauses]
	}
	for _, fe := range fes {
		typ := metav1.CauseTypeFieldValueInvalid
		if errors.Is(fe.Err, policy.ErrUnsupported) {
			typ = metav1.CauseTypeFieldValueNotSupported
		}
		st.Details.Causes = append(st.Details.Causes, metav1.StatusCause{Type: typ, Field: fe.Field, Message: fe.Err.Error()})
	}
	if more != "" {
		st.Details.Causes = append(st.Details.Causes, metav1.StatusCause{Type: metav1.CauseTypeFieldValueInvalid, Message: more})
	}
	return st
}

// FieldErrors returns the *policy.FieldErrors an error joins or wraps, in
// order, however deep.
func FieldErrors(err error) []*policy.FieldError {
	var out []*policy.FieldError
	var walk func(error)
	walk = func(err error) {
		switch e := err.(type) {
		case nil:
		case *policy.FieldError:
			out = append(out, e)
		case interface{ Unwrap() []error }:
			for _, c := range e.Unwrap() {
				walk(c)
			}
		case interface{ Unwrap() error }:
			walk(e.Unwrap())
		}
	}
	walk(err)
	return out
}

// decode decodes an object into the client-go type of its version, as an
// informer does, and gives it the request's namespace when it names none.
func decode[T any](raw []byte, ns string, meta func(*T) *metav1.ObjectMeta) (*T, error) {
	obj := new(T)
	if err := json.Unmarshal(raw, obj); err != nil {
		return nil, fmt.Errorf("admission: decode: %w", err)
	}
	if m := meta(obj); m.Namespace == "" {
		m.Namespace = ns
	}
	return obj, nil
}

func checkAuthorizationPolicy[T any](convert func(*T) (*policy.Policy, error), meta func(*T) *metav1.ObjectMeta) func([]byte, string, Providers) verdict {
	return func(raw []byte, ns string, providers Providers) verdict {
		obj, err := decode(raw, ns, meta)
		if err != nil {
			return verdict{err: err, decode: true}
		}
		p, err := convert(obj)
		if err != nil {
			return verdict{err: err}
		}
		if err := providers(p); err != nil {
			return verdict{err: err, unavailable: len(FieldErrors(err)) == 0}
		}
		return verdict{}
	}
}

// warning words a mesh refusal as an admission warning, which kubectl
// prints as "Warning: ...".
func warning(ref *mesh.Refusal) string {
	return fmt.Sprintf("trustmesh ignores %s: %s", ref.Object, ref.Reason)
}
