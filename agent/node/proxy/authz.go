package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
)

// check is one inbound connection's attributes, as the control plane's
// ext_authz reads a TCP connection (no HTTP).
type check struct {
	source      spiffeid.ID
	sourceAddr  netip.AddrPort
	dest        spiffeid.ID
	destLabels  map[string]string
	destination netip.AddrPort
}

func sockAddr(ap netip.AddrPort) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ap.Addr().Unmap().String(), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
	}}}
}

func (c check) request() *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{
			Address: sockAddr(c.sourceAddr), Principal: c.source.String(),
		},
		Destination: &authv3.AttributeContext_Peer{
			Address: sockAddr(c.destination), Principal: c.dest.String(), Labels: c.destLabels,
		},
	}}
}

// deniedError is ext_authz's denial.
type deniedError struct{ msg string }

func (e *deniedError) Error() string { return "denied by policy: " + e.msg }

// authorize asks ext_authz; nil is an allow. Anything but an OK answer
// refuses (fail closed): a denial is a *deniedError, a failure to ask
// another error.
func (p *Proxy) authorize(ctx context.Context, c check) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.AuthzTimeout)
	defer cancel()
	resp, err := p.authz.Check(ctx, c.request())
	if err != nil {
		return fmt.Errorf("ext_authz at %s: %w", p.cfg.AuthzAddress, err)
	}
	switch codes.Code(resp.GetStatus().GetCode()) {
	case codes.OK:
		return nil
	case codes.PermissionDenied, codes.Unauthenticated:
		return &deniedError{resp.GetStatus().GetMessage()}
	default:
		return fmt.Errorf("ext_authz at %s answered %s: %s", p.cfg.AuthzAddress, codes.Code(resp.GetStatus().GetCode()), resp.GetStatus().GetMessage())
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
