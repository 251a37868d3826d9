// Package meshcheck is the one per-object check of the Istio mesh kinds
// trustmesh reads (PeerAuthentication, ServiceEntry, Gateway,
// VirtualService), by group, version and kind: it decodes an object into
// the client-go type of its version, as an informer does, and runs the
// mesh's own check of it (mesh.CheckPeerAuthentication,
// mesh.FromServiceEntry, mesh.CheckGateway; a VirtualService is only
// decoded). The admission webhook and `trustmesh analyze -f` dispatch
// through it, so that both judge a mesh object as the mesh model does.
package meshcheck

import (
	"encoding/json"
	"errors"
	"fmt"

	networkingapi "istio.io/api/networking/v1alpha3"
	securityapi "istio.io/api/security/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	networkingv1beta1 "istio.io/client-go/pkg/apis/networking/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/mesh"
)

// ErrDecode marks an object that does not decode into its kind's type.
var ErrDecode = errors.New("decode")

// Check checks one object (JSON) of a version of a kind: the mesh's
// refusals of it (the object is valid Istio that trustmesh ignores, in
// part or whole), or an error wrapping ErrDecode. An object that names no
// namespace is in ns.
type Check func(raw []byte, ns string) ([]mesh.Refusal, error)

// Kind is one mesh kind, in every version the Istio CRDs serve.
type Kind struct {
	Group    string
	Versions []string
	// Resource is the plural resource name, e.g. "peerauthentications".
	Resource string
	Kind     string
	// check is indexed by version.
	check map[string]Check
}

// Check returns the check of a version of the kind; nil when the kind has
// no such version.
func (k Kind) Check(version string) Check { return k.check[version] }

// Kinds are the mesh kinds trustmesh reads.
var Kinds = []Kind{
	{"security.istio.io", []string{"v1", "v1beta1"}, "peerauthentications", "PeerAuthentication",
		map[string]Check{
			"v1": checkPeerAuthentication(func(o *securityv1.PeerAuthentication) (*metav1.ObjectMeta, *securityapi.PeerAuthentication) {
				return &o.ObjectMeta, &o.Spec
			}),
			"v1beta1": checkPeerAuthentication(func(o *securityv1beta1.PeerAuthentication) (*metav1.ObjectMeta, *securityapi.PeerAuthentication) {
				return &o.ObjectMeta, &o.Spec
			}),
		}},
	{"networking.istio.io", []string{"v1", "v1beta1", "v1alpha3"}, "serviceentries", "ServiceEntry",
		map[string]Check{
			"v1": checkServiceEntry(func(o *networkingv1.ServiceEntry) (*metav1.ObjectMeta, *serviceEntry) { return &o.ObjectMeta, &o.Spec }),
			"v1beta1": checkServiceEntry(func(o *networkingv1beta1.ServiceEntry) (*metav1.ObjectMeta, *serviceEntry) {
				return &o.ObjectMeta, &o.Spec
			}),
			"v1alpha3": checkServiceEntry(func(o *networkingv1alpha3.ServiceEntry) (*metav1.ObjectMeta, *serviceEntry) {
				return &o.ObjectMeta, &o.Spec
			}),
		}},
	{"networking.istio.io", []string{"v1", "v1beta1", "v1alpha3"}, "gateways", "Gateway",
		map[string]Check{
			"v1":       checkGateway(func(o *networkingv1.Gateway) (*metav1.ObjectMeta, *gateway) { return &o.ObjectMeta, &o.Spec }),
			"v1beta1":  checkGateway(func(o *networkingv1beta1.Gateway) (*metav1.ObjectMeta, *gateway) { return &o.ObjectMeta, &o.Spec }),
			"v1alpha3": checkGateway(func(o *networkingv1alpha3.Gateway) (*metav1.ObjectMeta, *gateway) { return &o.ObjectMeta, &o.Spec }),
		}},
	{"networking.istio.io", []string{"v1", "v1beta1", "v1alpha3"}, "virtualservices", "VirtualService",
		map[string]Check{
			"v1":       decodeOnly[networkingv1.VirtualService],
			"v1beta1":  decodeOnly[networkingv1beta1.VirtualService],
			"v1alpha3": decodeOnly[networkingv1alpha3.VirtualService],
		}},
}

// ByResource returns the kind of a group and resource; false when
// trustmesh reads no such mesh kind.
func ByResource(group, resource string) (Kind, bool) {
	for _, k := range Kinds {
		if k.Group == group && k.Resource == resource {
			return k, true
		}
	}
	return Kind{}, false
}

// ByKind returns the kind of a group and kind; false when trustmesh reads
// no such mesh kind.
func ByKind(group, kind string) (Kind, bool) {
	for _, k := range Kinds {
		if k.Group == group && k.Kind == kind {
			return k, true
		}
	}
	return Kind{}, false
}

type (
	serviceEntry = networkingapi.ServiceEntry
	gateway      = networkingapi.Gateway
)

// decode decodes an object into the client-go type of its version, as an
// informer does, and gives it ns when it names no namespace.
func decode[T any](raw []byte, ns string, meta func(*T) *metav1.ObjectMeta) (*T, error) {
	obj := new(T)
	if err := json.Unmarshal(raw, obj); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	if m := meta(obj); m.Namespace == "" {
		m.Namespace = ns
	}
	return obj, nil
}

func checkPeerAuthentication[T any](parts func(*T) (*metav1.ObjectMeta, *securityapi.PeerAuthentication)) Check {
	return func(raw []byte, ns string) ([]mesh.Refusal, error) {
		obj, err := decode(raw, ns, func(o *T) *metav1.ObjectMeta { m, _ := parts(o); return m })
		if err != nil {
			return nil, err
		}
		m, spec := parts(obj)
		return one(mesh.CheckPeerAuthentication(m.Namespace, m.Name, spec)), nil
	}
}

func checkServiceEntry[T any](parts func(*T) (*metav1.ObjectMeta, *serviceEntry)) Check {
	return func(raw []byte, ns string) ([]mesh.Refusal, error) {
		obj, err := decode(raw, ns, func(o *T) *metav1.ObjectMeta { m, _ := parts(o); return m })
		if err != nil {
			return nil, err
		}
		m, spec := parts(obj)
		_, ref := mesh.FromServiceEntry(m.Namespace, m.Name, spec)
		return one(ref), nil
	}
}

func checkGateway[T any](parts func(*T) (*metav1.ObjectMeta, *gateway)) Check {
	return func(raw []byte, ns string) ([]mesh.Refusal, error) {
		obj, err := decode(raw, ns, func(o *T) *metav1.ObjectMeta { m, _ := parts(o); return m })
		if err != nil {
			return nil, err
		}
		m, spec := parts(obj)
		return mesh.CheckGateway(m.Namespace, m.Name, spec), nil
	}
}

func decodeOnly[T any](raw []byte, _ string) ([]mesh.Refusal, error) {
	if err := json.Unmarshal(raw, new(T)); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	return nil, nil
}

func one(ref *mesh.Refusal) []mesh.Refusal {
	if ref == nil {
		return nil
	}
	return []mesh.Refusal{*ref}
}
