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
// cancelled ctx is a clean exit; otherwise the first part's failure (or
// panic) is the error.
func (cp *ControlPlane) Run(ctx context.Context) error {
	defer cp.close()
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
		cp.stop,
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
	if cp.policyFeed != nil {
		tasks = append(tasks, cp.policyFeed.Run)
	}
	if cp.meshFeed != nil {
		tasks = append(tasks, cp.meshFeed.Run)
	}
	if cp.authz != nil {
		tasks = append(tasks, cp.authz.Run)
	}
	if cp.injector != nil {
		tasks = append(tasks, cp.injector.Run)
	}
	if cp.xds != nil {
		tasks = append(tasks, cp.xds.Run)
	}
	tasks = append(tasks, cp.bundleFns...)
	if cp.bundle != nil {
		tasks = append(tasks, func(context.Context) error { return serveHTTP(cp.bundle, cp.bundleLis, true, "bundle endpoint") })
	}
	a := cp.Addrs()
	cp.cfg.Log.Info("trustmesh control plane serving", "trust_domain", cp.cfg.td.Name(),
		"ca", a.CA.String(), "monitoring", a.Monitoring.String(), "bundle_endpoint", addrString(a.Bundle),
		"data_dir", cp.cfg.DataDir, "kubernetes", cp.cfg.inKube)
	cp.ready.Store(true)
	if err := run.Tasks(ctx, tasks...); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// stop waits for the end of ctx, then stops the servers: not ready, the
// bundle watchers told, the CA port drained (10 s at most) and the HTTP
// servers shut down (5 s at most).
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
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	errs := []error{cp.monitoring.Shutdown(sctx)}
	if cp.bundle != nil {
		errs = append(errs, cp.bundle.Shutdown(sctx))
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
	if cp.injector != nil {
		_ = cp.injector.Close()
	}
	for _, l := range []net.Listener{cp.caLis, cp.monLis, cp.bundleLis} {
		if l != nil {
			_ = l.Close()
		}
	}
	if cp.journal != nil {
		_ = cp.journal.Close()
	}
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
