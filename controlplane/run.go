package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"golang.org/x/sync/errgroup"
)

// Run serves until ctx ends or a server fails, then stops everything. A
// cancelled ctx is a clean exit.
func (cp *ControlPlane) Run(ctx context.Context) error {
	defer cp.close()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return cp.refusals.Run(gctx) })
	g.Go(func() error { return cp.journal.Watch(gctx) })
	if cp.witness != nil {
		g.Go(func() error { return cp.witness.Run(gctx) })
	}
	if cp.rotation != nil {
		g.Go(func() error { return cp.rotation.Run(gctx, cp.authority.Replace) })
	}
	if cp.elector != nil {
		g.Go(func() error { return cp.elector.Run(gctx) })
	}
	if cp.policyFeed != nil {
		g.Go(func() error { return cp.policyFeed.Run(gctx) })
	}
	if cp.authz != nil {
		g.Go(func() error { return cp.authz.Run(gctx) })
	}
	if cp.injector != nil {
		g.Go(func() error { return cp.injector.Run(gctx) })
	}
	if cp.xds != nil {
		g.Go(func() error { return cp.xds.Run(gctx) })
	}
	for _, run := range cp.bundleFns {
		g.Go(func() error { return run(gctx) })
	}
	g.Go(func() error {
		if err := cp.grpc.Serve(cp.caLis); err != nil {
			return fmt.Errorf("controlplane: CA server: %w", err)
		}
		return nil
	})
	g.Go(func() error { return serveHTTP(cp.monitoring, cp.monLis, false, "monitoring") })
	if cp.bundle != nil {
		g.Go(func() error { return serveHTTP(cp.bundle, cp.bundleLis, true, "bundle endpoint") })
	}
	g.Go(func() error {
		<-gctx.Done()
		cp.ready.Store(false)
		close(cp.stopping)
		stopped := make(chan struct{})
		go func() { cp.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			cp.grpc.Stop()
		}
		sctx, cancel := context.WithTimeout(context.WithoutCancel(gctx), 5*time.Second)
		defer cancel()
		errs := []error{cp.monitoring.Shutdown(sctx)}
		if cp.bundle != nil {
			errs = append(errs, cp.bundle.Shutdown(sctx))
		}
		return errors.Join(errs...)
	})
	a := cp.Addrs()
	cp.cfg.Log.Info("trustmesh control plane serving", "trust_domain", cp.cfg.td.Name(),
		"ca", a.CA.String(), "monitoring", a.Monitoring.String(), "bundle_endpoint", addrString(a.Bundle),
		"data_dir", cp.cfg.DataDir, "kubernetes", cp.cfg.inKube)
	cp.ready.Store(true)
	err := g.Wait()
	if errors.Is(err, context.Canceled) || (err == nil && ctx.Err() != nil) {
		return nil
	}
	return err
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
