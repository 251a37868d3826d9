//go:build !linux

package capture

import (
	"context"
	"net"
	"net/netip"
)

// Do fails off Linux.
func (n Netns) Do(func() error) error { return ErrUnsupported }

// Listen fails off Linux.
func (n Netns) Listen(context.Context, string, string, int) (net.Listener, error) {
	return nil, ErrUnsupported
}

// ListenTransparent fails off Linux.
func (n Netns) ListenTransparent(context.Context, string, string, int) (net.Listener, error) {
	return nil, ErrUnsupported
}

// Dial fails off Linux.
func (n Netns) Dial(context.Context, string, string, int) (net.Conn, error) {
	return nil, ErrUnsupported
}

// DialTransparent fails off Linux.
func (n Netns) DialTransparent(context.Context, string, netip.Addr, netip.AddrPort, int) (net.Conn, error) {
	return nil, ErrUnsupported
}

// IPv6 fails off Linux.
func IPv6(Netns) (present, disabled bool, err error) { return false, false, ErrUnsupported }

// Install fails off Linux.
func Install(context.Context, Netns, Rules) error { return ErrUnsupported }

// Remove fails off Linux.
func Remove(context.Context, Netns) error { return ErrUnsupported }

// ProbeTPROXY fails off Linux.
func ProbeTPROXY(context.Context, Netns, bool) error { return ErrUnsupported }

// OriginalDst fails off Linux.
func OriginalDst(net.Conn) (netip.AddrPort, error) { return netip.AddrPort{}, ErrUnsupported }

// PodNetns fails off Linux.
func PodNetns(string, string) (Netns, error) { return Netns{}, ErrUnsupported }

// PodNetnsUnder fails off Linux.
func PodNetnsUnder(string, string, string) (Netns, error) { return Netns{}, ErrUnsupported }
