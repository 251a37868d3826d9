// Package hbone is HBONE, the tunnel ambient mode carries workload traffic
// in, in Istio's wire format so that a ztunnel could be a peer: TLS 1.3 with
// ALPN "h2" to port 15008, then one classic HTTP/2 CONNECT stream per
// tunnelled TCP connection, whose :authority is the destination workload's
// "ip:port" (no :path, no :scheme), answered 200 and followed by the bytes of
// the connection in DATA frames.
//
// Both ends authenticate with SPIFFE SVIDs: the client presents the source
// workload's, the server the destination workload's, and each verifies that
// the other's chains to the trust bundle. The client requires the exact
// SPIFFE ID the mesh model names for the destination (secure naming); the
// server hands the verified client ID to its Accept callback, which decides.
//
// Headers. The client sends nothing but the CONNECT pseudo-headers: no
// user-agent, no accept-encoding, and none of the "baggage", "traceparent"
// or "forwarded" headers ztunnel may add. The server learns the source's
// identity from its certificate and its address from the connection (the
// node proxy dials from inside the source pod's network namespace), so
// nothing in a header is needed, and the server ignores whatever headers a
// peer sends: none of them is authenticated.
//
// Half-close. On the client, the connection Dial returns has CloseWrite: it
// ends the request stream (END_STREAM), the server's Tunnel then reads
// io.EOF, and the client can go on reading the answer. The server's Tunnel
// has no half-close: golang.org/x/net/http2's server offers a handler no way
// to end its response while it still reads the request, so Close ends both
// directions (END_STREAM after all data written, then RST_STREAM NO_ERROR if
// the client was still sending), and the client reads everything written,
// then io.EOF.
//
// Pooling. Istio's HBONE page (istio.io/latest/docs/ambient/architecture/hbone)
// has a source and destination identity pair share one connection for all
// its tunnels. Dial does not pool: its TLS connection carries one tunnel,
// which costs a handshake per tunnelled connection (BenchmarkSetup). A Pool
// does, per source ID, destination ID and address, opening another
// connection when the peer's stream limit is reached. The server accepts up
// to ServerConfig.MaxConcurrentStreams tunnels on one connection.
package hbone

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ALPN is the application protocol HBONE negotiates; nothing else is accepted.
const ALPN = "h2"

// ErrHandshake marks a tunnel that failed before its CONNECT was sent or
// read: TLS (including a peer certificate that does not verify or names the
// wrong SPIFFE ID), the TLS version or the ALPN protocol.
var ErrHandshake = errors.New("hbone: handshake failed")

// ErrPeerID is the client's refusal of a server whose verified SPIFFE ID is
// not the destination's (it comes wrapped in ErrHandshake).
var ErrPeerID = errors.New("hbone: peer presented the wrong SPIFFE ID")

// StatusError is the server's answer when it did not open the tunnel: 403
// for a refusal by Accept, 405 for a method other than CONNECT, 400 for an
// :authority that is not "ip:port", 503 when the server is shutting down.
type StatusError struct{ Code int }

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: tunnel refused with HTTP status %d", e.Code)
}

// checkAuthority accepts "ip:port" with an IP literal (IPv6 in brackets), as
// HBONE names a destination by address.
func checkAuthority(authority string) error {
	ap, err := netip.ParseAddrPort(authority)
	if err != nil {
		return fmt.Errorf("hbone: authority %q is not ip:port: %w", authority, err)
	}
	if ap.Port() == 0 {
		return fmt.Errorf("hbone: authority %q has port 0", authority)
	}
	if ap.Addr().Zone() != "" {
		return fmt.Errorf("hbone: authority %q has an IPv6 zone", authority)
	}
	return nil
}

// peerID returns the SPIFFE ID of a verified TLS peer.
func peerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("hbone: peer presented no certificate")
	}
	uris := cs.PeerCertificates[0].URIs
	if len(uris) != 1 {
		return spiffeid.ID{}, fmt.Errorf("hbone: peer certificate has %d URI SANs, want 1", len(uris))
	}
	id, err := spiffeid.FromURI(uris[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("hbone: peer certificate: %w", err)
	}
	return id, nil
}

// checkNegotiated refuses a connection that is not TLS 1.3 with ALPN h2. The
// configs already require both; this is the check that does not depend on
// how crypto/tls treats a peer that offers neither.
func checkNegotiated(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("hbone: TLS version %#x, want TLS 1.3", cs.Version)
	}
	if cs.NegotiatedProtocol != ALPN {
		return fmt.Errorf("hbone: ALPN %q, want %q", cs.NegotiatedProtocol, ALPN)
	}
	return nil
}
