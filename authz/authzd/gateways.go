package authzd

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/mesh"
)

// GatewayIDs returns the mesh's gateway identities for remote.ip
// (engine.RemoteIP): the SPIFFE IDs of the workloads its gateways
// configure (mesh.GatewayWorkloads), leaving out any ID that another
// workload of the mesh also holds, since that workload's clients could
// then set the client address.
func GatewayIDs(m *mesh.Mesh) engine.GatewayIDs {
	ids, _ := gatewayIDs(m)
	return ids
}

// gatewayIDs is GatewayIDs, and the gateway IDs it left out because
// another workload shares them.
func gatewayIDs(m *mesh.Mesh) (ids engine.GatewayIDs, shared []string) {
	ids, gateway := engine.GatewayIDs{}, map[*mesh.Workload]bool{}
	for _, g := range m.Gateways {
		for _, w := range m.GatewayWorkloads(g) {
			gateway[w] = true
			ids[w.ID.String()] = true
		}
	}
	for _, w := range m.AllWorkloads() {
		if id := w.ID.String(); !gateway[w] && ids[id] {
			delete(ids, id)
			shared = append(shared, id)
		}
	}
	return ids, shared
}

// meshGateways is a live engine.Gateways over a mesh source: load reads
// it, run keeps it current and keeps the last good set on a bad update.
type meshGateways struct {
	src mesh.Source
	log *slog.Logger
	cur atomic.Pointer[engine.GatewayIDs]
}

var _ engine.Gateways = (*meshGateways)(nil)

func (g *meshGateways) IsGateway(id string) bool {
	p := g.cur.Load()
	return p != nil && p.IsGateway(id)
}

func (g *meshGateways) load() error {
	m, err := g.src.Mesh()
	if err != nil {
		return fmt.Errorf("authzd: mesh gateways: %w", err)
	}
	ids, shared := gatewayIDs(m)
	for _, id := range shared {
		// Only a gateway's own identity may vouch for a client address, so
		// this gateway's requests are decided on their direct peer: a DENY
		// on remoteIpBlocks there matches less than Istio's would.
		g.log.Warn("a gateway shares its SPIFFE ID with a workload that is not a gateway; remote.ip at this gateway is the direct peer, so give the gateway a service account of its own", "spiffe_id", id)
	}
	g.cur.Store(&ids)
	return nil
}

// run watches the source until ctx ends, closing ready after the first
// load, which must succeed.
func (g *meshGateways) run(ctx context.Context, ready chan<- struct{}) error {
	kick := make(chan struct{}, 1)
	done, err := g.src.Watch(ctx, func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return fmt.Errorf("authzd: watching the mesh: %w", err)
	}
	if err := g.load(); err != nil {
		return err
	}
	close(ready)
	for {
		select {
		case err := <-done:
			return err
		case <-kick:
			if err := g.load(); err != nil {
				g.log.Warn("mesh update refused for gateway identities, last good set kept", "err", err)
			}
		}
	}
}
