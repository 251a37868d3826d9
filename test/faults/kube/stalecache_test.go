package kube_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
)

// hiddenFromWatches names a service account that watches never show, as a
// cache a moment behind lacks a new one.
const hiddenFromWatches = "lagging"

// flakyAPIServer is a fake clientset whose service-account calls can be cut
// off as a stopped apiserver cuts them: the open watch ends, and every list,
// watch and get fails until it is back.
type flakyAPIServer struct {
	*fake.Clientset
	down       atomic.Bool
	tries      atomic.Int64 // calls refused while down
	refuseGets atomic.Bool  // gets alone fail, as when only the cache can answer

	mu      sync.Mutex
	watches []watch.Interface
}

func newFlakyAPIServer(objs ...runtime.Object) *flakyAPIServer {
	f := &flakyAPIServer{Clientset: fake.NewClientset(objs...)}
	refuse := func(k8stesting.Action) (bool, runtime.Object, error) {
		if f.down.Load() {
			f.tries.Add(1)
			return true, nil, errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
		}
		return false, nil, nil
	}
	f.PrependReactor("list", "serviceaccounts", refuse)
	f.PrependReactor("get", "serviceaccounts", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if f.refuseGets.Load() {
			return true, nil, errors.New("get refused by the test")
		}
		return refuse(a)
	})
	gvr := schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}
	f.PrependWatchReactor("serviceaccounts", func(a k8stesting.Action) (bool, watch.Interface, error) {
		if f.down.Load() {
			f.tries.Add(1)
			return true, nil, errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
		}
		w, err := f.Tracker().Watch(gvr, a.GetNamespace())
		if err != nil {
			return true, nil, err
		}
		w = watch.Filter(w, func(ev watch.Event) (watch.Event, bool) {
			m, err := meta.Accessor(ev.Object)
			return ev, err != nil || m.GetName() != hiddenFromWatches
		})
		f.mu.Lock()
		f.watches = append(f.watches, w)
		f.mu.Unlock()
		return true, w, nil
	})
	return f
}

// stop cuts the apiserver off: its watches end and new calls fail.
func (f *flakyAPIServer) stop() {
	f.down.Store(true)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, w := range f.watches {
		w.Stop()
	}
	f.watches = nil
}

func (f *flakyAPIServer) start() { f.down.Store(false) }

// eventually polls check, on real time, until it returns nil.
func eventually(t *testing.T, within time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// watching waits until the cache is fed by an open watch again, as it is
// once the reflector has listed and then watched. A renewal check that
// passes says only that the list has answered; the reflector opens its
// watch after that, and a clock stepped in between finds the cache,
// rightly, stale. An account created now that reaches the cache while gets
// are refused can only have come by a watch. The fake apiserver does not
// replay to a watch what was created before it opened, so a new account is
// created until one arrives.
func watching(t *testing.T, api *flakyAPIServer, check func(spiffeid.ID, string) error, td spiffeid.TrustDomain, ns string) {
	t.Helper()
	api.refuseGets.Store(true)
	defer api.refuseGets.Store(false)
	deadline := time.Now().Add(30 * time.Second)
	for n := 0; ; n++ {
		name := fmt.Sprintf("probe-%d", probes.Add(1))
		if _, err := api.CoreV1().ServiceAccounts(ns).Create(context.Background(), &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name)}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		probe := spiffeid.RequireFromSegments(td, "ns", ns, "sa", name)
		for wait := time.Now().Add(time.Second); time.Now().Before(wait); time.Sleep(10 * time.Millisecond) {
			if check(probe, "uid-"+name) == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no account created reached the cache by a watch within 30s (%d tried)", n+1)
		}
	}
}

var probes atomic.Int64

func refusal(err error, kind ca.RefusalKind, reason string) error {
	r, ok := ca.AsRefusal(err)
	if !ok || r.Kind != kind || r.Reason != reason {
		return errors.New("got " + errString(err) + "; want a refusal " + kind.String() + "/" + reason)
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

// TestRenewalTrustsTheAccountCacheForABoundedTime: the renewal re-check
// reads the service-account cache, so renewal goes on while the apiserver
// is away, for StaleCacheLimit on the authenticator's clock after the cache
// last heard from it, and is refused as unavailable, saying since when,
// after that. A cache that is idle but still watching is not stale, however
// long nothing changes; once the apiserver is back the cache is trusted
// again, and a deletion it then sees refuses renewal.
func TestRenewalTrustsTheAccountCacheForABoundedTime(t *testing.T) {
	const limit = 5 * time.Minute
	start := time.Date(2026, 12, 6, 3, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(start)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	web := spiffeid.RequireFromSegments(td, "ns", "team-a", "sa", "web")
	gone := spiffeid.RequireFromSegments(td, "ns", "team-a", "sa", "gone")
	api := newFlakyAPIServer(
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web", UID: "uid-web"}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "gone", UID: "uid-gone"}},
	)
	k, err := authn.NewKubernetes(authn.KubernetesConfig{TrustDomain: td, Client: api, Clock: clk, StaleCacheLimit: limit})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run() = %v", err)
		}
	})
	check := func(id spiffeid.ID, uid string) error { return k.CheckServiceAccount(ctx, id, uid) }

	eventually(t, 10*time.Second, "the cache syncs", func() error { return check(web, "uid-web") })
	if err := refusal(check(web, "uid-before"), ca.KindDenied, ca.ReasonAccountDeleted); err != nil {
		t.Fatalf("an account created again: %v", err)
	}
	// Deleted while the apiserver is up: the cache learns of it.
	if err := api.CoreV1().ServiceAccounts("team-a").Delete(ctx, "gone", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a deleted account refuses renewal", func() error {
		return refusal(check(gone, "uid-gone"), ca.KindDenied, ca.ReasonAccountDeleted)
	})

	// Idle, but watching: an hour with no change is not staleness.
	watching(t, api, check, td, "team-a")
	clk.Step(time.Hour)
	if err := check(web, "uid-web"); err != nil {
		t.Fatalf("after an idle hour with the watch open: %v", err)
	}

	// The apiserver stops at t0: the watch ends, and the cache is stale
	// from then on.
	t0 := clk.Now()
	api.stop()
	eventually(t, 10*time.Second, "the reflector tries the stopped apiserver", func() error {
		if api.tries.Load() == 0 {
			return errors.New("no call yet")
		}
		return nil
	})
	clk.Step(limit - time.Second)
	if err := check(web, "uid-web"); err != nil {
		t.Fatalf("renewal %s into the outage, within the %s limit: %v", limit-time.Second, limit, err)
	}
	if err := refusal(check(gone, "uid-gone"), ca.KindDenied, ca.ReasonAccountDeleted); err != nil {
		t.Fatalf("an account deleted before the outage, during it: %v", err)
	}
	clk.Step(2 * time.Second)
	err = check(web, "uid-web")
	if err := refusal(err, ca.KindUnavailable, ca.ReasonRenewalCheckFailed); err != nil {
		t.Fatalf("renewal past the limit: %v", err)
	}
	var stale *authn.StaleCacheError
	if !errors.As(err, &stale) || !stale.Since.Equal(t0) || stale.Limit != limit {
		t.Fatalf("renewal past the limit = %v; want a StaleCacheError since %s", err, t0)
	}

	// Back: the reflector lists again, and the cache is trusted again.
	api.start()
	eventually(t, 30*time.Second, "renewal once the apiserver is back", func() error { return check(web, "uid-web") })
	watching(t, api, check, td, "team-a")
	clk.Step(time.Hour)
	if err := check(web, "uid-web"); err != nil {
		t.Fatalf("an idle hour after the return: %v", err)
	}
	if err := api.CoreV1().ServiceAccounts("team-a").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a deletion after the return refuses renewal", func() error {
		return refusal(check(web, "uid-web"), ca.KindDenied, ca.ReasonAccountDeleted)
	})
}

// TestRenewalConfirmsWhatTheCacheLacks: an account the cache has not seen
// (a cache a moment behind) is asked of the apiserver before renewal is
// refused; when the apiserver cannot answer, the cache's answer stands.
func TestRenewalConfirmsWhatTheCacheLacks(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	api := newFlakyAPIServer(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web", UID: "uid-web"}})
	k, err := authn.NewKubernetes(authn.KubernetesConfig{TrustDomain: td, Client: api, Clock: clocktesting.NewFakeClock(time.Now())})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	defer func() { cancel(); <-done }()
	web := spiffeid.RequireFromSegments(td, "ns", "team-a", "sa", "web")
	eventually(t, 10*time.Second, "the cache syncs", func() error { return k.CheckServiceAccount(ctx, web, "uid-web") })
	if _, err := api.CoreV1().ServiceAccounts("team-a").Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: hiddenFromWatches, UID: "uid-new"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromSegments(td, "ns", "team-a", "sa", hiddenFromWatches)
	if err := k.CheckServiceAccount(ctx, id, "uid-new"); err != nil {
		t.Fatalf("an account the apiserver has and the cache lacks: %v", err)
	}
	if err := refusal(k.CheckServiceAccount(ctx, id, "uid-old"), ca.KindDenied, ca.ReasonAccountDeleted); err != nil {
		t.Fatalf("an account created again, confirmed by the apiserver: %v", err)
	}
	api.down.Store(true)
	if err := refusal(k.CheckServiceAccount(ctx, id, "uid-new"), ca.KindDenied, ca.ReasonAccountDeleted); err != nil {
		t.Fatalf("the cache lacks it and the apiserver cannot answer: %v", err)
	}
}
