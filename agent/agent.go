// Package agent is the workload agent, trustmesh agent: it runs beside a
// workload, keeps the workload's private key local, obtains and renews its
// X.509-SVID from the trustmesh CA, follows the CA's trust bundle, and hands
// both to the workload over the SPIFFE Workload API and to Envoy over SDS on
// a unix socket, and optionally as files.
//
// The parts, each with its own Run:
//
//   - trustbundle: follows the CA's bundle stream;
//   - rotation: issues and renews the SVID;
//   - socket, serving workloadapi and sds;
//   - certdir and state: files, when asked for;
//   - monitoring: /healthz, /metrics and, given the pod's probes,
//     apphealth's /app-health/ for the kubelet.
//
// They share one identity.Store. Run supervises them: the first to fail stops
// the others and its error is returned.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/apphealth"
	"github.com/trustmesh/trustmesh/agent/certdir"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/monitoring"
	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/agent/socket"
	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/agent/workloadapi"
	"github.com/trustmesh/trustmesh/api/probe"
	supervisor "github.com/trustmesh/trustmesh/internal/run"
)

// Defaults.
const (
	DefaultSocketPath = "/run/trustmesh/agent.sock"
	// DefaultTokenFile is where the injector projects the service-account
	// token with the CA's audience.
	DefaultTokenFile = "/var/run/secrets/tokens/trustmesh-token"
	// JoinTokenEnv is the environment variable a join token may be passed
	// in. Never on the command line, where other processes can read it.
	JoinTokenEnv = "TRUSTMESH_JOIN_TOKEN"
)

// Config is the agent's raw configuration.
type Config struct {
	// CAAddress is the CA's host:port.
	CAAddress string
	// CAServerName is the name the CA's serving certificate must carry;
	// default the host of CAAddress.
	CAServerName string
	// CABundleFile holds the PEM roots to trust the CA with until its
	// bundle stream takes over.
	CABundleFile string

	// At most one of TokenFile, JoinTokenFile and JoinToken. With none,
	// TokenFile is DefaultTokenFile.
	TokenFile     string
	JoinTokenFile string
	JoinToken     string

	// SPIFFEID, if set, is the only identity the agent accepts.
	SPIFFEID string
	// KeyType is one of svid.KeyTypes; default svid.ECP256.
	KeyType string
	// CertTTL is the lifetime to ask for; zero lets the CA choose.
	CertTTL time.Duration

	// SocketPath defaults to DefaultSocketPath.
	SocketPath string
	// SocketGroup, a group name or number, may connect too; default none.
	SocketGroup string

	// StateDir, if set, persists the key and certificate across restarts.
	StateDir string
	// CertDir, if set, receives cert-chain.pem, key.pem and root-cert.pem.
	CertDir string

	// MonitoringAddress serves /healthz, /metrics and /app-health/; empty
	// disables it.
	MonitoringAddress string
	// AppProbers is the JSON the injector puts in probe.EnvVar: the pod's
	// original probes, which the agent then runs for the kubelet under
	// /app-health/ on MonitoringAddress. Empty serves none.
	AppProbers string

	// Clock defaults to the real clock.
	Clock clock.Clock
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registry, if set, receives the metrics; otherwise a new one is used.
	Registry *prometheus.Registry
}

// settings is a validated Config.
type settings struct {
	Config
	bootstrap []*x509.Certificate
	token     rotation.TokenSource
	id        spiffeid.ID
	keyType   svid.KeyType
	gid       int
	appHealth *apphealth.Handler
}

// Validate checks cfg as Run would, without starting anything.
func Validate(cfg Config) error {
	_, err := validate(cfg)
	return err
}

// validate applies defaults, then checks everything, collecting all errors.
func validate(cfg Config) (*settings, error) {
	s := &settings{Config: cfg, gid: -1, keyType: svid.ECP256}
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
	if s.CAAddress == "" {
		errs = append(errs, errors.New("agent: the CA address is required"))
	} else if _, _, err := net.SplitHostPort(s.CAAddress); err != nil {
		errs = append(errs, fmt.Errorf("agent: CA address: %w", err))
	}
	if s.CABundleFile == "" {
		errs = append(errs, errors.New("agent: a CA bundle file is required"))
	} else if roots, err := readRoots(s.CABundleFile); err != nil {
		errs = append(errs, err)
	} else {
		s.bootstrap = roots
	}
	switch n := countSet(s.TokenFile, s.JoinTokenFile, s.JoinToken); {
	case n > 1:
		errs = append(errs, fmt.Errorf("agent: give only one of a token file, a join token file and %s", JoinTokenEnv))
	case s.JoinTokenFile != "":
		s.token = rotation.FileToken(s.JoinTokenFile)
	case s.JoinToken != "":
		s.token = rotation.StaticToken(s.JoinToken)
	default:
		if s.TokenFile == "" {
			s.TokenFile = DefaultTokenFile
		}
		s.token = rotation.FileToken(s.TokenFile)
	}
	if s.SPIFFEID != "" {
		id, err := spiffeid.FromString(s.SPIFFEID)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent: SPIFFE ID: %w", err))
		}
		s.id = id
	}
	if s.KeyType != "" {
		kt, err := svid.ParseKeyType(s.KeyType)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent: %w", err))
		}
		s.keyType = kt
	}
	if s.CertTTL < 0 {
		errs = append(errs, fmt.Errorf("agent: negative certificate TTL %s", s.CertTTL))
	}
	if s.SocketGroup != "" {
		gid, err := lookupGroup(s.SocketGroup)
		if err != nil {
			errs = append(errs, err)
		}
		s.gid = gid
	}
	if s.MonitoringAddress != "" {
		if _, _, err := net.SplitHostPort(s.MonitoringAddress); err != nil {
			errs = append(errs, fmt.Errorf("agent: monitoring address: %w", err))
		}
	}
	if s.AppProbers != "" {
		if s.MonitoringAddress == "" {
			errs = append(errs, fmt.Errorf("agent: %s needs a monitoring address to serve the probes on", probe.EnvVar))
		}
		if probers, err := probe.Decode(s.AppProbers); err != nil {
			errs = append(errs, fmt.Errorf("agent: %w", err))
		} else if h, err := apphealth.New(apphealth.Config{Probers: probers, Logger: s.Logger.With("component", "apphealth")}); err != nil {
			errs = append(errs, err) // each problem on its own line, named by apphealth
		} else {
			s.appHealth = h
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

func countSet(vals ...string) int {
	n := 0
	for _, v := range vals {
		if v != "" {
			n++
		}
	}
	return n
}

func readRoots(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("agent: CA bundle: %w", err)
	}
	pool, err := parsePEMCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("agent: CA bundle %s: %w", path, err)
	}
	return pool, nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("agent: socket group: %w", err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("agent: socket group %s: %w", name, err)
	}
	return gid, nil
}

// Run validates cfg and runs the agent until ctx ends (a clean exit, nil)
// or a part of it fails (its error).
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

// assembled is the agent's parts, wired.
type assembled struct {
	log   *slog.Logger
	store *identity.Store
	parts []part
}

type part struct {
	name string
	run  func(context.Context) error
}

func build(s *settings) (*assembled, error) {
	log := s.Logger
	reg := s.Registry
	cred, err := NewCredential(CredentialConfig{
		CAAddress:    s.CAAddress,
		CAServerName: s.CAServerName,
		Bootstrap:    s.bootstrap,
		Token:        s.token,
		JoinToken:    s.JoinTokenFile != "" || s.JoinToken != "",
		ID:           s.id,
		KeyType:      s.keyType,
		TTL:          s.CertTTL,
		StateDir:     s.StateDir,
		Clock:        s.Clock,
		Logger:       log,
		Registerer:   reg,
	})
	if err != nil {
		return nil, err
	}
	store := cred.Store
	a := &assembled{log: log, store: store}
	for _, p := range cred.Parts() {
		a.parts = append(a.parts, part{p.Name, p.Run})
	}
	wl, err := workloadapi.New(workloadapi.Config{Source: store, Logger: log.With("component", "workloadapi")})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	sdsServer, err := sds.New(sds.Config{Source: store, Logger: log.With("component", "sds")})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	g := grpc.NewServer()
	wl.Register(g)
	sdsServer.Register(g)
	sock, err := socket.New(socket.Config{Path: s.SocketPath, GID: s.gid, Server: g, Logger: log.With("component", "socket")})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	a.parts = append(a.parts,
		part{"socket", sock.Run},
	)
	if s.CertDir != "" {
		w, err := certdir.New(certdir.Config{Dir: s.CertDir, Source: store, Logger: log.With("component", "certdir")})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		a.parts = append(a.parts, part{"cert dir", w.Run})
	}
	if s.MonitoringAddress != "" {
		if err := reg.Register(collectors.NewGoCollector()); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		mcfg := monitoring.Config{
			Address: s.MonitoringAddress, Source: store, Clock: s.Clock, Registry: reg, Logger: log.With("component", "monitoring"),
		}
		if s.appHealth != nil { // never a typed nil in the interface
			mcfg.AppHealth = s.appHealth
		}
		if cred.Manager != nil {
			mcfg.Why = cred.Manager.Health
		}
		mon, err := monitoring.New(mcfg)
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		a.parts = append(a.parts, part{"monitoring", mon.Run})
	}
	return a, nil
}

// run runs every part until the first one fails or ctx ends.
func (a *assembled) run(ctx context.Context) error {
	tasks := make([]supervisor.Task, 0, len(a.parts))
	for _, p := range a.parts {
		tasks = append(tasks, func(ctx context.Context) error {
			err := p.run(ctx)
			if err != nil && !errors.Is(err, context.Canceled) {
				a.log.Error("agent part failed; stopping", "part", p.name, "error", err)
				if strings.HasPrefix(err.Error(), p.name+": ") {
					// The part named itself already.
					return fmt.Errorf("agent: %w", err)
				}
				return fmt.Errorf("agent: %s: %w", p.name, err)
			}
			return err
		})
	}
	return supervisor.Tasks(ctx, tasks...)
}
