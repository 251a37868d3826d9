package node

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// ownNodeSVID keeps the node's own SVID, spiffe://TD/node/NAME, on
// Kubernetes, where the node authenticates to the CA with its token and has
// no certificate of its own: the proxy needs one for the xDS server and
// ext_authz. The CA issues it through the node's delegated batch (to a node
// that authenticated by its token, and only its own name); it is asked for
// again at half its lifetime, with the token (a delegated SVID is never
// renewed by presenting itself).
type ownNodeSVID struct {
	ca      NodeCA
	bundle  BundleSource
	name    string
	keyType svid.KeyType
	ttl     time.Duration
	clock   clock.Clock
	backoff backoff.Backoff
	log     *slog.Logger
	store   *identity.Store
}

// Run keeps the SVID until ctx ends.
func (n *ownNodeSVID) Run(ctx context.Context) error {
	for {
		var wait time.Duration
		got, err := n.issue(ctx)
		if err != nil {
			wait = n.backoff.Next()
			if ctx.Err() == nil {
				n.log.Warn("cannot obtain the node's own SVID for the proxy; retrying", "in", wait, "error", err)
			}
		} else {
			n.backoff.Reset()
			nb, exp := got.Certificates[0].NotBefore, svid.Expiry(got)
			wait = nb.Add(exp.Sub(nb) / 2).Sub(n.clock.Now())
			n.log.Info("node SVID issued", "spiffe_id", got.ID.String(), "expires", exp)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-n.clock.After(wait):
		}
	}
}

func (n *ownNodeSVID) issue(ctx context.Context) (*x509svid.SVID, error) {
	snap, _ := n.bundle.Load()
	if snap.Bundle == nil {
		return nil, errors.New("no trust bundle yet")
	}
	id, err := spiffeid.FromSegments(snap.Bundle.TrustDomain(), "node", n.name)
	if err != nil {
		return nil, err
	}
	key, err := svid.GenerateKey(n.keyType)
	if err != nil {
		return nil, err
	}
	csrPEM, err := svid.NewCSR(key, id)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(csrPEM)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := n.ca.BatchNewX509SVID(cctx, []*cav1.NewX509SVIDParams{{SpiffeId: id.String(), Csr: block.Bytes, TtlSeconds: int64(n.ttl / time.Second)}})
	if err != nil {
		return nil, err
	}
	if len(res) != 1 {
		return nil, fmt.Errorf("%d results for 1 param", len(res))
	}
	if c := codes.Code(res[0].GetCode()); c != codes.OK {
		return nil, fmt.Errorf("the CA refused %s: %s: %s (%s)", id, c, res[0].GetMessage(), res[0].GetReason())
	}
	chain, err := parseDERChain(res[0].GetCertChain())
	if err != nil {
		return nil, err
	}
	got, err := svid.Verify(svid.VerifyRequest{Chain: chain, Key: key, Bundle: snap.Bundle, Want: id, Now: n.clock.Now()})
	if err != nil {
		return nil, fmt.Errorf("refusing the node SVID from the CA: %w", err)
	}
	n.store.SetSVID(got)
	return got, nil
}
