package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/attest"
	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/caclient"
	"github.com/trustmesh/trustmesh/agent/monitoring"
	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/svid"
	supervisor "github.com/trustmesh/trustmesh/internal/run"
)

// Defaults of Config.
const (
	// DefaultTokenAudience is the audience the node agent's projected
	// service-account token must carry, as for every other caller of the
	// CA.
	DefaultTokenAudience = "istio-ca"
	// NodePathPrefix is the path of a node's own SPIFFE ID:
	// spiffe://TD/node/NAME.
	NodePathPrefix = "/node/"
)

// Config is the node agent's raw configuration.
type Config struct {
	// NodeName is this node's name; the CA must authenticate the node
	// under it.
	NodeName string
	// CAAddress is the CA's host:port; CAServerName the name its serving
	// certificate must carry (default the host of CAAddress).
	CAAddress    string
	CAServerName string
	// CABundleFile holds the PEM roots to trust the CA with until its
	// bundle stream takes over.
	CABundleFile string

	// Exactly one of TokenFile (Kubernetes: the node agent's projected
	// service-account token, audience DefaultTokenAudience, re-read at
	// every call), JoinTokenFile and JoinToken (off Kubernetes: a join
	// token for spiffe://TD/node/NodeName). With none, StateDir must hold
	// a node SVID saved by an earlier run.
	TokenFile     string
	JoinTokenFile string
	JoinToken     string
	// StateDir keeps the node's own SVID across restarts (off Kubernetes;
	// a join token works once). Workload keys never touch it.
	StateDir string

	// SocketPath is the Workload API and SDS socket; default
	// DefaultSocketPath.
	SocketPath string
	// KeyType of every key; default svid.ECP256.
	KeyType string
	// CertTTL is the lifetime asked for the workload certificates (and the
	// node's own); zero lets the CA choose.
	CertTTL time.Duration
	// SyncInterval between fetches of the node's entries; default
	// DefaultSyncInterval.
	SyncInterval time.Duration
	// PendingWait bounds the wait for a caller that matches no entry yet;
	// default DefaultPendingWait.
	PendingWait time.Duration
	// Attest configures how callers are attested.
	Attest attest.Options

	// MonitoringAddress serves /healthz and /metrics; empty disables it.
	MonitoringAddress string

	// Proxy runs the L4 proxy of ambient mode (agent/node/proxy) for the
	// node's ambient pods.
	Proxy bool
	// XDSAddress is the xDS server the proxy takes its workloads and policy
	// revision from (default CAAddress); XDSServerName the name its
	// serving certificate must carry (default CAServerName, or its host).
	XDSAddress    string
	XDSServerName string
	// AuthzAddress is the control plane's ext_authz the proxy asks about
	// every inbound connection (required with Proxy); AuthzServerName as
	// XDSServerName.
	AuthzAddress    string
	AuthzServerName string
	// NodeIP is this node's IP, part of the proxy's xDS node id (required
	// with Proxy).
	NodeIP string

	// Clock defaults to the real clock; Logger to slog.Default().
	Clock  clock.Clock
	Logger *slog.Logger
	// Registry, if set, receives the metrics; otherwise a new one is used.
	Registry *prometheus.Registry
}

// settings is a validated Config.
type settings struct {
	Config
	bootstrap []*x509.Certificate
	keyType   svid.KeyType
	// token is the bearer token on Kubernetes; nil off it.
	token rotation.TokenSource
	// join is the join token off Kubernetes; nil without one.
	join rotation.TokenSource
}

// Validate checks cfg as Run would, without starting anything.
func Validate(cfg Config) error {
	_, err := validate(cfg)
	return err
}

func validate(cfg Config) (*settings, error) {
	s := &settings{Config: cfg, keyType: svid.ECP256}
	if s.SocketPath == "" {
		s.SocketPath = DefaultSocketPath
	}
	if s.Clock == nil {
		s.Clock = clock.RealClock{}
	}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if s.Registry == nil {
		s.Registry = prometheus.NewRegistry()
	}
	var errs []error
	if s.NodeName == "" {
		errs = append(errs, errors.New("node: the node name is required"))
	} else if err := spiffeid.ValidatePathSegment(s.NodeName); err != nil {
		errs = append(errs, fmt.Errorf("node: node name %q is not a SPIFFE ID path segment: %w", s.NodeName, err))
	}
	if s.CAAddress == "" {
		errs = append(errs, errors.New("node: the CA address is required"))
	} else if _, _, err := net.SplitHostPort(s.CAAddress); err != nil {
		errs = append(errs, fmt.Errorf("node: CA address: %w", err))
	}
	if s.CABundleFile == "" {
		errs = append(errs, errors.New("node: a CA bundle file is required"))
	} else if roots, err := agent.ReadBundleFile(s.CABundleFile); err != nil {
		errs = append(errs, fmt.Errorf("node: %w", err))
	} else {
		s.bootstrap = roots
	}
	n := 0
	for _, v := range []string{s.TokenFile, s.JoinTokenFile, s.JoinToken} {
		if v != "" {
			n++
		}
	}
	switch {
	case n > 1:
		errs = append(errs, fmt.Errorf("node: give only one of a token file (Kubernetes), a join token file and a join token (%s)", agent.JoinTokenEnv))
	case s.TokenFile != "":
		s.token = rotation.FileToken(s.TokenFile)
		if s.StateDir != "" {
			errs = append(errs, errors.New("node: a state directory keeps a node SVID from a join token; on Kubernetes the node authenticates with its token file and keeps nothing"))
		}
	case s.JoinTokenFile != "":
		s.join = rotation.FileToken(s.JoinTokenFile)
	case s.JoinToken != "":
		s.join = rotation.StaticToken(s.JoinToken)
	case s.StateDir == "":
		errs = append(errs, errors.New("node: give a token file (Kubernetes, audience "+DefaultTokenAudience+
			"), or a join token for spiffe://TD/node/NAME (trustmesh ca token create --node NAME) with a state directory"))
	}
	if s.KeyType != "" {
		kt, err := svid.ParseKeyType(s.KeyType)
		if err != nil {
			errs = append(errs, fmt.Errorf("node: %w", err))
		}
		s.keyType = kt
	}
	if s.CertTTL < 0 {
		errs = append(errs, fmt.Errorf("node: negative certificate TTL %s", s.CertTTL))
	}
	if s.SyncInterval < 0 {
		errs = append(errs, fmt.Errorf("node: negative sync interval %s", s.SyncInterval))
	}
	if s.PendingWait < 0 {
		errs = append(errs, fmt.Errorf("node: negative pending wait %s", s.PendingWait))
	}
	if s.Proxy {
		if s.XDSAddress == "" {
			s.XDSAddress = s.CAAddress
		}
		if s.XDSServerName == "" && s.XDSAddress == s.CAAddress {
			s.XDSServerName = s.CAServerName
		}
		if _, _, err := net.SplitHostPort(s.XDSAddress); err != nil {
			errs = append(errs, fmt.Errorf("node: xDS address: %w", err))
		}
		if _, err := netip.ParseAddr(s.NodeIP); err != nil {
			errs = append(errs, fmt.Errorf("node: the proxy needs this node's IP (--node-ip), part of its xDS node id: %q: %w", s.NodeIP, err))
		}
		if s.AuthzAddress == "" {
			errs = append(errs, errors.New("node: the proxy needs the ext_authz address (--authz-address) to authorize inbound connections"))
		} else if _, _, err := net.SplitHostPort(s.AuthzAddress); err != nil {
			errs = append(errs, fmt.Errorf("node: ext_authz address: %w", err))
		}
	} else if s.XDSAddress != "" || s.AuthzAddress != "" {
		errs = append(errs, errors.New("node: the xDS and ext_authz addresses are the proxy's: they need --proxy"))
	}
	if s.MonitoringAddress != "" {
		if _, _, err := net.SplitHostPort(s.MonitoringAddress); err != nil {
			errs = append(errs, fmt.Errorf("node: monitoring address: %w", err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

// NodeIDError: the node's own SVID names another identity than
// spiffe://TD/node/NAME, so the join token was made for something else.
type NodeIDError struct {
	Got      spiffeid.ID
	NodeName string
}

func (e *NodeIDError) Error() string {
	return fmt.Sprintf("node: the node's SVID is %s, not spiffe://%s%s%s; the join token was made for another identity: "+
		"create one with `trustmesh ca token create --node %s`", e.Got, e.Got.TrustDomain().Name(), NodePathPrefix, e.NodeName, e.NodeName)
}

// part is one of the node agent's parts.
type part struct {
	name string
	run  func(context.Context) error
}

// assembled is the node agent's parts, wired.
type assembled struct {
	log    *slog.Logger
	holder *Holder
	parts  []part
}

// Run validates cfg and runs the node agent until ctx ends (a clean exit,
// nil) or a part of it fails (its error).
func Run(ctx context.Context, cfg Config) error {
	s, err := validate(cfg)
	if err != nil {
		return err
	}
	a, err := build(s)
	if err != nil {
		return err
	}
	err = a.run(ctx)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	}
	return err
}

func build(s *settings) (*assembled, error) {
	log := s.Logger
	reg := s.Registry
	cred, err := agent.NewCredential(agent.CredentialConfig{
		CAAddress:    s.CAAddress,
		CAServerName: s.CAServerName,
		Bootstrap:    s.bootstrap,
		BundleOnly:   s.token != nil,
		Token:        s.join,
		JoinToken:    true,
		KeyType:      s.keyType,
		TTL:          s.CertTTL,
		StateDir:     s.StateDir,
		Clock:        s.Clock,
		Logger:       log,
		Registerer:   reg,
	})
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	ncfg := caclient.NodeConfig{Address: s.CAAddress, ServerName: s.CAServerName, Roots: cred.Roots, Now: s.Clock.Now}
	if s.token != nil {
		ncfg.Token = s.token.Token
	} else {
		ncfg.Certificate = func() *tls.Certificate {
			snap, _ := cred.Store.Load()
			if snap.SVID == nil || !isNodeID(snap.SVID.ID, s.NodeName) {
				return nil
			}
			return tlsCertificate(snap.SVID)
		}
	}
	client, err := caclient.NewNodeClient(ncfg)
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	holder, err := NewHolder(HolderConfig{
		CA: client, Bundle: cred.Store, NodeName: s.NodeName, Clock: s.Clock, KeyType: s.keyType, TTL: s.CertTTL,
		SyncInterval: s.SyncInterval, Backoff: backoff.Backoff{Initial: time.Second, Max: time.Minute},
		Logger: log.With("component", "holder"), Registerer: reg,
	})
	if err != nil {
		return nil, err
	}
	srv, err := NewServer(ServerConfig{
		Identities: holder, SocketPath: s.SocketPath, Attest: s.Attest, PendingWait: s.PendingWait,
		Clock: s.Clock, Logger: log.With("component", "server"),
	})
	if err != nil {
		return nil, err
	}
	a := &assembled{log: log, holder: holder}
	for _, p := range cred.Parts() {
		a.parts = append(a.parts, part{p.Name, p.Run})
	}
	a.parts = append(a.parts,
		part{"holder", holder.Run},
		part{"socket", srv.Run},
		part{"ca client", func(ctx context.Context) error { <-ctx.Done(); _ = client.Close(); return ctx.Err() }},
	)
	if s.Proxy {
		pp, err := newProxy(s, cred, client, holder, reg)
		if err != nil {
			return nil, err
		}
		a.parts = append(a.parts, pp...)
	}
	if s.token == nil {
		a.parts = append(a.parts, part{"node identity", func(ctx context.Context) error { return checkNodeID(ctx, cred, s.NodeName) }})
	}
	if s.MonitoringAddress != "" {
		if err := reg.Register(collectors.NewGoCollector()); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		mon, err := monitoring.New(monitoring.Config{
			Address: s.MonitoringAddress, Source: cred.Store, Clock: s.Clock, Registry: reg,
			Logger: log.With("component", "monitoring"),
			Health: func() (string, error) { return health(s, cred, holder) },
		})
		if err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		a.parts = append(a.parts, part{"monitoring", mon.Run})
	}
	return a, nil
}

// health is /healthz: the node's credential, then its entries and
// workload certificates.
func health(s *settings, cred *agent.Credential, h *Holder) (string, error) {
	snap, _ := cred.Store.Load()
	switch {
	case snap.Bundle == nil:
		return "", errors.New("no trust bundle yet")
	case s.token != nil:
		if _, err := s.token.Token(); err != nil {
			return "", fmt.Errorf("no node credential: %w", err)
		}
	case snap.SVID == nil:
		return "", errors.New("no node SVID yet")
	case !s.Clock.Now().Before(svid.Expiry(snap.SVID)):
		return "", errors.New("the node SVID expired")
	}
	if err := h.Healthy(); err != nil {
		return "", err
	}
	return fmt.Sprintf("node %s holds %d identities", s.NodeName, h.Held()), nil
}

func isNodeID(id spiffeid.ID, name string) bool {
	return id.Path() == NodePathPrefix+name
}

// checkNodeID stops the node agent, with a clear error, as soon as its own
// SVID (restored or issued) names another identity than
// spiffe://TD/node/NAME.
func checkNodeID(ctx context.Context, cred *agent.Credential, name string) error {
	for {
		snap, changed := cred.Store.Load()
		if snap.SVID != nil && !isNodeID(snap.SVID.ID, name) {
			return &NodeIDError{Got: snap.SVID.ID, NodeName: name}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

func tlsCertificate(s *x509svid.SVID) *tls.Certificate {
	der := make([][]byte, len(s.Certificates))
	for i, c := range s.Certificates {
		der[i] = c.Raw
	}
	return &tls.Certificate{Certificate: der, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
}

// run runs every part until the first one fails or ctx ends.
func (a *assembled) run(ctx context.Context) error {
	tasks := make([]supervisor.Task, 0, len(a.parts))
	for _, p := range a.parts {
		tasks = append(tasks, func(ctx context.Context) error {
			err := p.run(ctx)
			if err != nil && !errors.Is(err, context.Canceled) {
				a.log.Error("node agent part failed; stopping", "part", p.name, "error", err)
				if strings.HasPrefix(err.Error(), "node: ") {
					return err
				}
				return fmt.Errorf("node: %s: %w", p.name, err)
			}
			return err
		})
	}
	return supervisor.Tasks(ctx, tasks...)
}
