package kube_test

import (
	"context"
	"testing"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/authz/source/sourcetest"
)

// kubeStore is the Kubernetes source over a namespace of its own on the
// real apiserver; Put creates, updates and deletes AuthorizationPolicies.
type kubeStore struct {
	src    *kube.Source
	client versioned.Interface
	ns     string
}

func (k *kubeStore) Source() source.PolicySource { return k.src }
func (k *kubeStore) Namespace() string           { return k.ns }

func (k *kubeStore) Put(t *testing.T, docs map[string]string) {
	t.Helper()
	ctx := context.Background()
	api := k.client.SecurityV1().AuthorizationPolicies(k.ns)
	list, err := api.List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]*securityv1.AuthorizationPolicy{}
	for _, p := range list.Items {
		if _, keep := docs[p.Name]; !keep {
			if err := api.Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		have[p.Name] = p
	}
	for name, doc := range docs {
		obj := &securityv1.AuthorizationPolicy{}
		if err := yaml.Unmarshal([]byte(doc), obj); err != nil {
			t.Fatal(err)
		}
		obj.Name, obj.Namespace = name, k.ns
		if old, ok := have[name]; ok {
			if yamlOf(t, &old.Spec) == yamlOf(t, &obj.Spec) {
				continue
			}
			obj.ResourceVersion = old.ResourceVersion
			_, err = api.Update(ctx, obj, metav1.UpdateOptions{})
		} else {
			_, err = api.Create(ctx, obj, metav1.CreateOptions{})
		}
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
}

func yamlOf(t *testing.T, v any) string {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestKubernetesContract runs the policy-source contract on the real
// apiserver, watching one namespace per store.
func TestKubernetesContract(t *testing.T) {
	cfg := apiserver.Config(t)
	client, err := versioned.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sourcetest.Run(t, func(t *testing.T) sourcetest.Store {
		ns, err := kc.CoreV1().Namespaces().Create(context.Background(),
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "contract-"}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return &kubeStore{src: &kube.Source{Client: client, Namespace: ns.Name}, client: client, ns: ns.Name}
	})
}
