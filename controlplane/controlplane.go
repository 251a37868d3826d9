// Package controlplane assembles trustmesh's control plane from its
// components and runs it: the CA on its gRPC port, the SPIFFE bundle
// endpoint, and health and metrics on the monitoring port. `trustmesh serve`
// is a thin wrapper around it.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/authz/authzd"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/ca/server"
	"github.com/trustmesh/trustmesh/injector/webhook"
	"github.com/trustmesh/trustmesh/internal/dirlock"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
)

// ControlPlane is a loaded control plane with its listeners bound.
type ControlPlane struct {
	cfg       *validated
	authority *authority.Authority
	ca        *ca.CA
	journal   *journal.Store
	refusals  *journal.RefusalLog
	cluster   *cluster // the API server, on Kubernetes
	witness   *journal.ExportWitness
	rotation  *rotation.Manager
	elector   *elector
	kubeAuth  *authn.Kubernetes // its service-account cache runs with the control plane
	authz     *authzd.Service
	// policyFeed is the AuthorizationPolicy feed authz and xDS follow.
	policyFeed *source.Feed
	// meshFeed is the mesh feed authz and xDS follow.
	meshFeed *mesh.Feed
	// nodes authorizes node agents' delegated issuance over meshFeed; nil
	// without a mesh.
	nodes     *NodeModel
	webhooks  *webhook.Server // /inject and /validate, on Kubernetes
	xds       *xds.Server
	bundleFns []func(context.Context) error // caBundle patchers, root-cert publisher
	stopping  chan struct{}
	serving   *server.ServingCert
	registry  *prometheus.Registry

	grpc       *grpc.Server
	monitoring *http.Server
	bundle     *http.Server
	ui         *http.Server // the web UI, unless --listen-ui=off
	uiLis      net.Listener
	caLis      net.Listener
	monLis     net.Listener
	bundleLis  net.Listener
	// reserved holds the authorization service's port, which its server
	// binds itself once its policies load, from New's check that every
	// port is free until Run; and the injector's, until New hands it to
	// the webhook server.
	reserved map[string]net.Listener
	// lock holds the data directory while this control plane runs.
	lock  *dirlock.Lock
	ready atomic.Bool
	// httpGrace bounds the HTTP servers' shutdown; zero is 5 s.
	httpGrace time.Duration
}

// New loads the CA material and the journal and binds every listener. An
// error leaves nothing running, and nothing written: New checks the
// configuration and every input it names (Check), takes the data
// directory's lock and binds every port before it creates the data
// directory, the CA, its keys or the journal, and a data directory this
// start created is removed again when a later step fails.
func New(ctx context.Context, cfg Config) (_ *ControlPlane, err error) {
	v, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	if err := v.checkInputs(ctx); err != nil {
		return nil, err
	}
	cp := &ControlPlane{cfg: v, registry: prometheus.NewRegistry(), reserved: map[string]net.Listener{}}
	// created is set when this start made the data directory and holds its
	// lock: only then is the directory its own to remove. made are the
	// missing parents it made.
	created := false
	var made []string
	defer func() {
		if err != nil {
			lock := cp.lock
			cp.lock = nil
			cp.close()
			if created {
				// Removed while still locked, so that no other serve
				// starts in it meanwhile.
				_ = os.RemoveAll(v.DataDir)
			}
			_ = lock.Unlock()
			for i := len(made) - 1; i >= 0; i-- {
				_ = os.Remove(made[i]) // only if still empty
			}
		}
	}()
	exists, err := dataDirExists(v.DataDir)
	if err != nil {
		return nil, err
	}
	if exists {
		// A second serve on this directory is refused here, naming the
		// first, before it binds a port the first may hold.
		if err := cp.lockDataDir(); err != nil {
			return nil, err
		}
	}
	if v.inKube {
		if cp.cluster, err = newCluster(v.Kubernetes); err != nil {
			return nil, err
		}
	}
	if err := cp.bindAll(v); err != nil {
		return nil, err
	}
	if !exists {
		var leaf bool
		if made, leaf, err = mkdirs(v.DataDir); err != nil {
			return nil, fmt.Errorf("controlplane: data dir: %w", err)
		}
		// Another serve may have made the directory since the check
		// above, and may hold it: then this one is refused here, and
		// leaves the directory alone.
		if err := cp.lockDataDir(); err != nil {
			return nil, err
		}
		created = leaf
	}
	if err := cp.openJournal(ctx, v); err != nil {
		return nil, err
	}
	if err := cp.newAuthority(ctx, v); err != nil {
		return nil, err
	}
	authenticator, err := cp.newAuthenticator(v)
	if err != nil {
		return nil, err
	}
	if err := cp.newCAServer(ctx, v, authenticator); err != nil {
		return nil, err
	}
	if cp.xds, err = cp.newXDS(v); err != nil {
		return nil, err
	}
	if cp.xds != nil {
		cp.xds.Register(cp.grpc)
	}
	cp.stopping = make(chan struct{})
	cav1.RegisterTrustBundleServiceServer(cp.grpc, &server.BundleService{Bundles: cp.authority, Done: cp.stopping})

	if cp.authz, err = cp.newAuthz(v); err != nil {
		return nil, err
	}
	if err := cp.newWebhooks(v); err != nil {
		return nil, err
	}
	if err := cp.newMonitoring(v); err != nil {
		return nil, err
	}
	if err := cp.newUI(v); err != nil {
		return nil, err
	}
	return cp, nil
}

// dataDirLock is the lock file in the data directory that one serve holds.
// Operator commands (trustmesh ca, audit) do not take it: they work beside
// a running serve, as the README shows.
const dataDirLock = "serve.lock"

func (cp *ControlPlane) lockDataDir() error {
	l, err := dirlock.TryLock(cp.cfg.DataDir, dataDirLock, "trustmesh serve", cp.cfg.Clock.Now())
	var held *dirlock.HeldError
	if errors.As(err, &held) {
		return fmt.Errorf("controlplane: %w; stop it, or give this serve another --data-dir", err)
	}
	if err != nil {
		return fmt.Errorf("controlplane: data dir: %w", err)
	}
	cp.lock = l
	return nil
}

// dataDirExists reports whether the data directory exists; a path that is
// not a directory is an error naming --data-dir.
func dataDirExists(dir string) (bool, error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, setting("data-dir", err)
	case !fi.IsDir():
		return false, setting("data-dir", fmt.Errorf("%s is not a directory", dir))
	}
	return true, nil
}

// mkdirs makes dir and its missing parents one at a time, and returns the
// parents it made itself and whether it made dir: a directory another
// process made meanwhile is not this one's to remove.
func mkdirs(dir string) (parents []string, leaf bool, err error) {
	var missing []string
	for p := filepath.Clean(dir); ; {
		if _, err := os.Stat(p); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, false, err
		}
		missing = append(missing, p)
		up := filepath.Dir(p)
		if up == p {
			break
		}
		p = up
	}
	for i := len(missing) - 1; i >= 0; i-- {
		err := os.Mkdir(missing[i], 0o700)
		switch {
		case errors.Is(err, fs.ErrExist):
			continue
		case err != nil:
			return parents, false, err
		case i == 0:
			leaf = true
		default:
			parents = append(parents, missing[i])
		}
	}
	return parents, leaf, nil
}

// IsLeader reports whether this replica runs singleton work (CA rotation).
// Without leader election every control plane is its own leader.
func (cp *ControlPlane) IsLeader() bool { return cp.elector == nil || cp.elector.IsLeader() }

// Rotation is the CA rotation manager.
func (cp *ControlPlane) Rotation() *rotation.Manager { return cp.rotation }

// XDSPushes counts the configurations the xDS server has pushed: the first
// load and every change of the mesh or the policies. Zero without an xDS
// server.
func (cp *ControlPlane) XDSPushes() uint64 {
	if cp.xds == nil {
		return 0
	}
	return cp.xds.Pushes()
}

// Addrs are the bound addresses, useful when listening on port 0.
type Addrs struct {
	CA, Monitoring, Bundle net.Addr
	// UI is the web UI's address, nil when it is off.
	UI net.Addr
	// Injector is the admission webhooks' address, nil when they are off
	// (off Kubernetes, or --listen-injector=off).
	Injector net.Addr
}

// Addrs returns the bound listener addresses.
func (cp *ControlPlane) Addrs() Addrs {
	a := Addrs{CA: cp.caLis.Addr(), Monitoring: cp.monLis.Addr()}
	if cp.bundleLis != nil {
		a.Bundle = cp.bundleLis.Addr()
	}
	if cp.uiLis != nil {
		a.UI = cp.uiLis.Addr()
	}
	if cp.webhooks != nil {
		a.Injector = cp.webhooks.Addr()
	}
	return a
}
