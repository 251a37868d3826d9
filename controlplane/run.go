package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/trustmesh/trustmesh/internal/run"
)

// Run serves until ctx ends or a part fails, then stops everything. A
// cancelled ctx is a clean exit unless the servers could not be stopped
// cleanly (connections still open when the grace period ended); otherwise
// the first part's failure (or panic) is the error.
func (cp *ControlPlane) Run(ctx context.Context) error {
	defer cp.close()
	// The supervisor drops what parts return once ctx has ended, as
	// consequences of the stop; an unclean stop is not one, so it is kept
	// here. Tasks has returned, and so has stop, before it is read.
	var stopErr error
	tasks := []run.Task{
		cp.refusals.Run,
		cp.journal.Watch,
		func(ctx context.Context) error {
			if err := cp.grpc.Serve(cp.caLis); err != nil {
				return fmt.Errorf("controlplane: CA server: %w", err)
			}
			return nil
		},
		func(context.Context) error { return serveHTTP(cp.monitoring, cp.monLis, false, "monitoring") },
		func(ctx context.Context) error { stopErr = cp.stop(ctx); return stopErr },
	}
	if cp.witness != nil {
		tasks = append(tasks, cp.witness.Run)
	}
	if cp.rotation != nil {
		tasks = append(tasks, func(ctx context.Context) error { return cp.rotation.Run(ctx, cp.authority.Replace) })
	}
	if cp.elector != nil {
		tasks = append(tasks, cp.elector.Run)
	}
	if cp.kubeAuth != nil {
		tasks = append(tasks, cp.kubeAuth.Run)
	}
	if cp.policyFeed != nil {
		tasks = append(tasks, cp.policyFeed.Run)
	}
	if cp.meshFeed != nil {
		tasks = append(tasks, cp.meshFeed.Run)
	}
	if cp.authz != nil {
		tasks = append(tasks, cp.authz.Run)
	}
	if cp.webhooks != nil {
		tasks = append(tasks, cp.webhooks.Run)
	}
	if cp.xds != nil {
		tasks = append(tasks, cp.xds.Run)
	}
	tasks = append(tasks, cp.bundleFns...)
	if cp.bundle != nil {
		tasks = append(tasks, func(context.Context) error { return serveHTTP(cp.bundle, cp.bundleLis, true, "bundle endpoint") })
	}
	if cp.ui != nil {
		tasks = append(tasks, func(context.Context) error { return serveHTTP(cp.ui, cp.uiLis, cp.ui.TLSConfig != nil, "web UI") })
	}
	a := cp.Addrs()
	cp.cfg.Log.Info("trustmesh control plane serving", "trust_domain", cp.cfg.td.Name(),
		"ca", a.CA.String(), "monitoring", a.Monitoring.String(), "bundle_endpoint", addrString(a.Bundle), "ui", addrString(a.UI),
		"data_dir", cp.cfg.DataDir, "kubernetes", cp.cfg.inKube)
	cp.ready.Store(true)
	// The authorization service binds its port itself, once its policies
	// have loaded.
	cp.release("listen-authz")
	if err := run.Tasks(ctx, tasks...); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	if stopErr != nil {
		return fmt.Errorf("controlplane: stop: %w", stopErr)
	}
	return nil
}

// stop waits for the end of ctx, then stops the servers: not ready, the
// bundle watchers told, the CA port drained (10 s at most) and the HTTP
// servers shut down (cp.httpGrace, 5 s unless a test shortens it).
func (cp *ControlPlane) stop(ctx context.Context) error {
	<-ctx.Done()
	cp.ready.Store(false)
	close(cp.stopping)
	stopped := make(chan struct{})
	go func() { cp.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		cp.grpc.Stop()
	}
	grace := cp.httpGrace
	if grace == 0 {
		grace = 5 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), grace)
	defer cancel()
	errs := []error{cp.monitoring.Shutdown(sctx)}
	if cp.bundle != nil {
		errs = append(errs, cp.bundle.Shutdown(sctx))
	}
	if cp.ui != nil {
		errs = append(errs, cp.ui.Shutdown(sctx))
	}
	return errors.Join(errs...)
}

func serveHTTP(s *http.Server, l net.Listener, tls bool, what string) error {
	var err error
	if tls {
		err = s.ServeTLS(l, "", "")
	} else {
		err = s.Serve(l)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("controlplane: %s server: %w", what, err)
	}
	return nil
}

func (cp *ControlPlane) close() {
	if cp.webhooks != nil {
		_ = cp.webhooks.Close()
	}
	for _, l := range []net.Listener{cp.caLis, cp.monLis, cp.bundleLis, cp.uiLis} {
		if l != nil {
			_ = l.Close()
		}
	}
	for flag := range cp.reserved {
		cp.release(flag)
	}
	if cp.journal != nil {
		_ = cp.journal.Close()
	}
	_ = cp.lock.Unlock()
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
