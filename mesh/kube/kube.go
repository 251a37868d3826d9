// Package kube builds the mesh model from Kubernetes through informers:
// Services, EndpointSlices and Pods (their labels, service accounts, nodes
// and IPs) for mesh services and their workloads, with the data-plane mode
// from the pods' and their Namespaces' labels (DataPlaneMode); Istio ServiceEntries
// (MESH_EXTERNAL) for external hosts; Istio Gateways, with the
// VirtualServices bound to them, for the gateways (a server with tls.mode
// SIMPLE and a credentialName is an ingress server, one with ISTIO_MUTUAL
// makes its Gateway the egress gateway); kubernetes.io/tls Secrets that
// gateways name; and PeerAuthentications, of which only STRICT is honoured.
package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/trustmesh/trustmesh/mesh"
)

// ErrNotWatching is returned by Mesh before Watch has synced.
var ErrNotWatching = errors.New("mesh/kube: not watching yet")

// Source is the Kubernetes mesh.Source.
type Source struct {
	Client      kubernetes.Interface
	Istio       istioclient.Interface
	TrustDomain spiffeid.TrustDomain
	// Domain is the cluster DNS domain; empty means cluster.local.
	Domain string
	// Resync is the informers' resync period; zero disables it.
	Resync time.Duration

	mu    sync.Mutex
	build func() (*mesh.Mesh, error)
}

var _ mesh.Source = (*Source)(nil)

// Watch starts the informers and returns once their caches have synced.
func (s *Source) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	if s.Client == nil || s.Istio == nil {
		return nil, errors.New("mesh/kube: a Kubernetes and an Istio client are required")
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { changed() },
		UpdateFunc: func(any, any) { changed() },
		DeleteFunc: func(any) { changed() },
	}
	kf := informers.NewSharedInformerFactory(s.Client, s.Resync)
	secrets := informers.NewSharedInformerFactoryWithOptions(s.Client, s.Resync, informers.WithTweakListOptions(func(o *metav1ListOptions) {
		o.FieldSelector = "type=" + string(corev1.SecretTypeTLS)
	}))
	istio := istioinformers.NewSharedInformerFactory(s.Istio, s.Resync)
	l := &listers{
		services:   kf.Core().V1().Services(),
		slices:     kf.Discovery().V1().EndpointSlices(),
		pods:       kf.Core().V1().Pods(),
		secrets:    secrets.Core().V1().Secrets(),
		entries:    istio.Networking().V1().ServiceEntries(),
		gateways:   istio.Networking().V1().Gateways(),
		routes:     istio.Networking().V1().VirtualServices(),
		peerAuths:  istio.Security().V1().PeerAuthentications(),
		namespaces: kf.Core().V1().Namespaces(),
	}
	var synced []cache.InformerSynced
	for _, inf := range []cache.SharedIndexInformer{
		l.services.Informer(), l.slices.Informer(), l.pods.Informer(), l.secrets.Informer(),
		l.entries.Informer(), l.gateways.Informer(), l.routes.Informer(), l.peerAuths.Informer(),
		l.namespaces.Informer(),
	} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return nil, fmt.Errorf("mesh/kube: %w", err)
		}
		synced = append(synced, inf.HasSynced)
	}
	ctx, cancel := context.WithCancel(ctx)
	kf.Start(ctx.Done())
	secrets.Start(ctx.Done())
	istio.Start(ctx.Done())
	stop := func() {
		cancel()
		kf.Shutdown()
		secrets.Shutdown()
		istio.Shutdown()
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		stop()
		return nil, fmt.Errorf("mesh/kube: informers did not sync: %w", ctx.Err())
	}
	s.mu.Lock()
	s.build = func() (*mesh.Mesh, error) { return l.mesh(s.TrustDomain, s.domain()) }
	s.mu.Unlock()
	out := make(chan error, 1)
	go func() {
		<-ctx.Done()
		stop()
		out <- nil
	}()
	return out, nil
}

// Mesh builds the mesh from the informers' caches.
func (s *Source) Mesh() (*mesh.Mesh, error) {
	s.mu.Lock()
	build := s.build
	s.mu.Unlock()
	if build == nil {
		return nil, ErrNotWatching
	}
	return build()
}

func (s *Source) domain() string {
	if s.Domain == "" {
		return mesh.DefaultDomain
	}
	return s.Domain
}
