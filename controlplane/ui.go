package controlplane

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/internal/secretfile"
	"github.com/trustmesh/trustmesh/ui"
)

// DefaultListenUI is the web UI's address: loopback, like every listener
// by default, so that the monitoring port stays what Prometheus scrapes.
const DefaultListenUI = "127.0.0.1:15018"

// UIConfig configures the web UI on Listen.UI.
type UIConfig struct {
	// AllowedHosts are further Host names the UI answers to, besides
	// loopback's and the bound address ("name" or "name:port").
	AllowedHosts []string
	// TokenFile holds the bearer token (ui.CheckToken: at least 16
	// characters, 8 of them different) that a client sends, or exchanges
	// at /ui/login for a session cookie. Only its owner may read it
	// (internal/secretfile; on Kubernetes also the pod's own group).
	TokenFile string
	// TLSCert and TLSKey serve the UI over HTTPS; ClientCA, with them,
	// requires a client certificate that chains to it, and ClientIDs are
	// the SPIFFE IDs (URI SAN) of the certificates let in: required with
	// ClientCA.
	TLSCert, TLSKey, ClientCA string
	ClientIDs                 []string
	// InsecureHTTP allows a token over plain HTTP off loopback, where
	// the network can read it.
	InsecureHTTP bool
	// Replica labels this replica's denials; default $POD_NAME, else the
	// host name.
	Replica string
}

// uiOn reports whether the web UI is served.
func (v *validated) uiOn() bool { return v.Listen.UI != "" && v.Listen.UI != "off" }

// check checks the UI group against its listen address: a listener that
// is not on loopback must authenticate (fail closed).
func (c *UIConfig) check(listen string) []error {
	if listen == "" || listen == "off" {
		return nil
	}
	var errs []error
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, setting("ui-tls-cert", errors.New("give both --ui-tls-cert and --ui-tls-key, or neither")))
	}
	if c.ClientCA != "" && c.TLSCert == "" {
		errs = append(errs, setting("ui-client-ca", errors.New("client certificates need HTTPS: give --ui-tls-cert and --ui-tls-key too")))
	}
	if !ui.IsLoopback(listen) && c.TokenFile == "" && c.ClientCA == "" {
		errs = append(errs, setting("listen-ui", fmt.Errorf("%s is not on loopback, and the web UI shows the mesh's identities, policies and denials: give --ui-token-file or --ui-client-ca (or listen on 127.0.0.1)", listen)))
	}
	if c.ClientCA != "" && len(c.ClientIDs) == 0 {
		errs = append(errs, setting("ui-client-id", errors.New("--ui-client-ca needs the SPIFFE IDs let in (--ui-client-id, repeatable): "+
			"any certificate from that CA would do otherwise, and with the mesh's bundle that is every workload")))
	}
	if len(c.ClientIDs) > 0 && c.ClientCA == "" {
		errs = append(errs, setting("ui-client-id", errors.New("client IDs are checked on client certificates: give --ui-client-ca too")))
	}
	errs = append(errs, setting("ui-client-id", ui.CheckClientIDs(c.ClientIDs)))
	if !ui.IsLoopback(listen) && c.TokenFile != "" && c.TLSCert == "" && !c.InsecureHTTP {
		errs = append(errs, setting("ui-token-file", fmt.Errorf("%s is not on loopback and the web UI has no TLS: the token and the session cookie would cross the network in clear; "+
			"give --ui-tls-cert and --ui-tls-key, or --ui-insecure-http to accept that", listen)))
	}
	errs = append(errs, setting("ui-allowed-host", ui.CheckAllowedHosts(c.AllowedHosts)))
	return errs
}

// inputs reads the files the UI group names: the token (readable by its
// owner only; on Kubernetes, whose Secret volumes are root:FSGROUP with
// g+r, by the pod's own group too), and the TLS certificate, key and
// client CA.
func (c *UIConfig) inputs(inKube bool) (token string, tlsCfg *tls.Config, errs []error) {
	if c.TokenFile != "" {
		b, err := secretfile.Read(c.TokenFile, secretfile.Options{OwnGroup: inKube})
		token = strings.TrimSpace(string(b))
		if err == nil {
			if err = ui.CheckToken(token); err != nil {
				err = fmt.Errorf("%s: %w", c.TokenFile, err)
			}
		}
		errs = append(errs, setting("ui-token-file", err))
	}
	if c.TLSCert != "" && c.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(c.TLSCert, c.TLSKey)
		errs = append(errs, setting("ui-tls-cert", err))
		tlsCfg = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
		if c.ClientCA != "" {
			pool := x509.NewCertPool()
			b, err := os.ReadFile(c.ClientCA)
			if err == nil && !pool.AppendCertsFromPEM(b) {
				err = fmt.Errorf("%s holds no PEM certificates", c.ClientCA)
			}
			errs = append(errs, setting("ui-client-ca", err))
			// With a token too, either proves who calls: a browser with
			// no certificate must still reach the sign-in form.
			auth := tls.RequireAndVerifyClientCert
			if c.TokenFile != "" {
				auth = tls.VerifyClientCertIfGiven
			}
			tlsCfg.ClientCAs, tlsCfg.ClientAuth = pool, auth
		}
	}
	return token, tlsCfg, errs
}

// replica names this replica: the UI config's, else $POD_NAME, else the
// host name.
func (c *UIConfig) replica() string {
	if c.Replica != "" {
		return c.Replica
	}
	if p := os.Getenv("POD_NAME"); p != "" {
		return p
	}
	h, _ := os.Hostname()
	return h
}

// newUI builds the web UI's server on its bound listener, with adapters
// from the control plane's parts to the views' data.
func (cp *ControlPlane) newUI(v *validated) error {
	if cp.uiLis == nil {
		return nil
	}
	token, tlsCfg, errs := v.UI.inputs(v.inKube)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("controlplane: invalid configuration: %w", inGroup("UI", errs...))
	}
	// The access view quotes policies' header values and paths as serve's
	// decision log would show a request's: its default header allowlist
	// and --log-redact-path (which Validate has checked).
	redact, err := decisionlog.NewRedactor(nil, nil, v.Authz.LogRedactPaths)
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	sh := newUIShared(cp)
	acc := &uiAccess{sh: sh, policies: cp.policyFeed, mesh: cp.meshFeed, rootNS: v.Authz.RootNamespace, redact: redact}
	cfg := ui.Config{
		Addr: cp.uiLis.Addr().String(), AllowedHosts: v.UI.AllowedHosts, Token: token, ClientCerts: v.UI.ClientCA != "", ClientIDs: v.UI.ClientIDs,
		Replica: v.UI.replica(), TrustDomain: v.td.Name(), Clock: v.Clock, Log: v.Log,
		Identities: &uiIdentities{sh: sh},
		CA:         &uiCA{sh: sh},
		Journal:    &uiJournal{cp: cp, dir: admin.DataDir(v.DataDir), witness: v.Journal.Witness},
		Access:     acc,
		Denials:    &uiDenials{access: acc},
	}
	if cp.authz != nil {
		cfg.Denials.(*uiDenials).log = cp.authz.DecisionLog()
	}
	h, err := ui.New(cfg)
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	if v.UI.InsecureHTTP && tlsCfg == nil && !ui.IsLoopback(v.Listen.UI) && token != "" {
		v.Log.Warn("web UI: serving its token and session cookie over plain HTTP off loopback (--ui-insecure-http): anyone on the network path can read them",
			"listen", v.Listen.UI)
	}
	cp.ui = v.Listen.Connections.HTTPServer(h)
	cp.ui.TLSConfig = tlsCfg
	return nil
}
