package check

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/trustmesh/trustmesh/internal/human"
	"github.com/trustmesh/trustmesh/xds"
)

// The codes of the control plane checks.
const (
	CodeReady      = "TM-CP-001"
	CodeXDSClients = "TM-XDS-001"
	CodeXDSStale   = "TM-XDS-002"
)

// maxBody bounds what is read of a monitoring answer.
const maxBody = 16 << 20

// get asks the monitoring port for path and returns the status and body.
func get(ctx context.Context, cfg Config, path string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+cfg.Monitoring+path, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("check: %w", err)
	}
	resp, err := cfg.HTTP.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("check: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return 0, nil, fmt.Errorf("check: %s: %w", path, err)
	}
	return resp.StatusCode, b, nil
}

// checkReady asks the control plane's /readyz.
func checkReady(ctx context.Context, cfg Config, r *Report) {
	if cfg.Monitoring == "" {
		r.add(CodeReady, Info, "control plane", "pass serve's --listen-monitoring address as --monitoring to check the running control plane",
			"no --monitoring given; the running control plane was not checked")
		return
	}
	subject := "http://" + cfg.Monitoring + "/readyz"
	code, body, err := get(ctx, cfg, "/readyz")
	switch {
	case err != nil:
		r.add(CodeReady, Error, subject, "is trustmesh serve running, and is --monitoring its --listen-monitoring address?", "the control plane does not answer: %v", err)
	case code != http.StatusOK:
		r.add(CodeReady, Error, subject, "see serve's log; a journal that does not match its checkpoints keeps it unready until an operator acts",
			"the control plane is not ready (%d): %s", code, strings.TrimSpace(string(body)))
	default:
		r.add(CodeReady, OK, subject, "", "the control plane is ready")
	}
}

// checkXDS reads the xDS clients from the monitoring port's debug endpoint
// (xds.ClientsPath) and reports the connected ones and the stale: connected
// over state of the world, with a version sent but not acknowledged for
// longer than StaleAfter by the server's clock.
func checkXDS(ctx context.Context, cfg Config, r *Report) {
	if cfg.Monitoring == "" {
		return // said by checkReady
	}
	subject := "http://" + cfg.Monitoring + xds.ClientsPath
	code, body, err := get(ctx, cfg, xds.ClientsPath)
	switch {
	case err != nil:
		r.add(CodeXDSClients, Error, subject, "is trustmesh serve running, and is --monitoring its --listen-monitoring address?", "the xDS clients cannot be read: %v", err)
		return
	case code == http.StatusNotFound && strings.Contains(string(body), "--debug-endpoints"):
		// Serve's answer when its debug endpoints are off, as the Helm
		// chart runs it: the monitoring port is reachable in the cluster.
		r.add(CodeXDSClients, Info, subject,
			"to check the xDS clients, run serve with --debug-endpoints (Helm: --set monitoring.debugEndpoints=true), on a monitoring address only operators reach",
			"the control plane's debug endpoints are off; the xDS clients were not checked")
		return
	case code == http.StatusNotFound:
		r.add(CodeXDSClients, Info, subject, "serve runs an xDS server with --mesh, or on Kubernetes", "the control plane runs no xDS server")
		return
	case code != http.StatusOK:
		r.add(CodeXDSClients, Error, subject, "see serve's log", "the xDS clients cannot be read (%d): %s", code, strings.TrimSpace(string(body)))
		return
	}
	var cs xds.Clients
	if err := json.Unmarshal(body, &cs); err != nil {
		r.add(CodeXDSClients, Error, subject, "is --monitoring a trustmesh control plane of this version?", "the xDS clients answer does not parse: %v", err)
		return
	}
	synced, delta, stale := 0, 0, 0
	for _, c := range cs.Clients {
		switch {
		case c.Synced:
			synced++
		case c.Delta:
			delta++
		case !c.PendingSince.IsZero() && cs.Time.Sub(c.PendingSince) > cfg.StaleAfter:
			stale++
			r.add(CodeXDSStale, Warning, c.NodeID,
				"the proxy has not acknowledged its configuration: see its log (Envoy: config_dump and rejected updates), and serve's log for rejections",
				"%s has left a version unacknowledged for %s (since %s), over --stale-after %s", c.SPIFFEID, human.Duration(cs.Time.Sub(c.PendingSince)),
				human.Time(c.PendingSince), human.Duration(cfg.StaleAfter))
		}
	}
	r.add(CodeXDSClients, OK, subject, "", "%d xDS clients connected: %d synced, %d stale, %d on delta streams (not tracked)", len(cs.Clients), synced, stale, delta)
}
