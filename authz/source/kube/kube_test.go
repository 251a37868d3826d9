package kube_test

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	apisecurityv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	"istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

var apiserver = kubeapi.Shared{CRDs: kubeapi.IstioCRDs}

func TestMain(m *testing.M) { apiserver.Main(m) }

func request(ns, path string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/" + ns + "/sa/web"},
		Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: path}},
	}}
}

// denyPath makes spec a DENY policy on path. (Specs are proto messages:
// they are filled in place, never copied.)
func denyPath(spec *apisecurityv1beta1.AuthorizationPolicy, path string) {
	spec.Action = apisecurityv1beta1.AuthorizationPolicy_DENY
	spec.Rules = []*apisecurityv1beta1.Rule{{To: []*apisecurityv1beta1.Rule_To{{
		Operation: &apisecurityv1beta1.Operation{Paths: []string{path}},
	}}}}
}

func v1Policy(ns, name, path string) *securityv1.AuthorizationPolicy {
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	denyPath(&p.Spec, path)
	return p
}

func TestKubernetesSource(t *testing.T) {
	client, err := versioned.NewForConfig(apiserver.Config(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	kc, err := kubernetes.NewForConfig(apiserver.Config(t))
	if err != nil {
		t.Fatal(err)
	}
	// A namespace of its own, so that -count=N runs do not see each other.
	nsObj, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "shop-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns := nsObj.Name
	v1 := client.SecurityV1().AuthorizationPolicies(ns)
	if _, err := v1.Create(ctx, v1Policy(ns, "deny-admin", "/admin"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	loads := make(chan error, 16)
	clk := testclock.NewFakeClock(time.Unix(0, 0))
	e := engine.New()
	l, err := source.New(source.Config{
		Engine: e, Policies: &kube.Source{Client: client}, Clock: clk, Settle: time.Second,
		OnLoad: func(err error) { loads <- err },
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if err := <-loads; err != nil {
		t.Fatal(err)
	}
	allowed := func(path string) bool {
		t.Helper()
		d, err := e.Check(ctx, request(ns, path))
		if err != nil {
			t.Fatal(err)
		}
		return d.Allowed
	}
	// next waits until a reload whose result satisfies ok, stepping the
	// settle timer whenever the loader waits on it.
	next := func(ok func(error) bool) error {
		t.Helper()
		guard := time.NewTimer(30 * time.Second) // a failure guard, not a wait
		defer guard.Stop()
		for {
			if clk.HasWaiters() {
				clk.Step(time.Second)
			}
			select {
			case err := <-loads:
				if ok(err) {
					return err
				}
			case <-guard.C:
				t.Fatal("no reload")
			default:
				runtime.Gosched()
			}
		}
	}
	succeeded := func(err error) bool { return err == nil }
	if allowed("/admin") || !allowed("/orders") {
		t.Fatal("first policy set not in force")
	}

	// An object created through v1beta1 is the same object, seen via v1.
	beta := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-orders", Namespace: ns}}
	denyPath(&beta.Spec, "/orders")
	if _, err := client.SecurityV1beta1().AuthorizationPolicies(ns).Create(ctx, beta, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Reloads for events from before the create (the informer's initial
	// adds) may come first; wait for the one that sees the new object.
	for allowed("/orders") {
		next(succeeded)
	}

	// An object trustmesh refuses is refused, naming it; the old set holds.
	bad := v1Policy(ns, "jwt", "/x")
	bad.Spec.Rules[0].From = []*apisecurityv1beta1.Rule_From{{Source: &apisecurityv1beta1.Source{RequestPrincipals: []string{"iss/sub"}}}}
	if _, err := v1.Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = next(func(err error) bool { return err != nil })
	if !errors.Is(err, source.ErrRefused) || !strings.Contains(err.Error(), "AuthorizationPolicy "+ns+"/jwt") ||
		!strings.Contains(err.Error(), "requestPrincipals") {
		t.Fatalf("refusal = %v", err)
	}
	if allowed("/admin") || allowed("/orders") {
		t.Fatal("a refused update changed decisions")
	}

	// Deleting the bad object and the first policy takes effect.
	for _, name := range []string{"jwt", "deny-admin"} {
		if err := v1.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for !allowed("/admin") {
		next(succeeded)
	}
	if allowed("/orders") {
		t.Fatal("deny-orders lost")
	}
}
