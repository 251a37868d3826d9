package connlimit_test

import (
	"bytes"
	"fmt"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestGRPCSendsNoPingPerRequest: a client's small requests on a kept
// connection (an xDS proxy's acknowledgements, an agent's renewals) cost
// the server no PING each. grpc-go's dynamic flow-control window (BDP
// estimation) pings the peer on the first DATA frame after each ping ack,
// so with it every request is answered with a PING to acknowledge too.
func TestGRPCSendsNoPingPerRequest(t *testing.T) {
	addr := serveGRPC(t, short)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	const requests = 20
	pings := 0
	for i := range requests {
		id := uint32(2*i + 1)
		hbuf.Reset()
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.health.v1.Health/Check"},
			{":authority", addr}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
			if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
				t.Fatal(err)
			}
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hbuf.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		// An empty HealthCheckRequest: uncompressed, zero length.
		if err := fr.WriteData(id, true, []byte{0, 0, 0, 0, 0}); err != nil {
			t.Fatal(err)
		}
		if err := awaitEnd(fr, id, &pings); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if pings > 1 {
		t.Fatalf("the server sent %d PINGs for %d small requests on one connection, want none per request", pings, requests)
	}
}

// awaitEnd reads frames until stream id ends, acknowledging the server's
// SETTINGS and PINGs (as a client does) and counting the PINGs.
func awaitEnd(fr *http2.Framer, id uint32, pings *int) error {
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return err
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					return err
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				*pings++
				if err := fr.WritePing(true, f.Data); err != nil {
					return err
				}
			}
		case *http2.GoAwayFrame:
			return fmt.Errorf("GOAWAY %v", f.ErrCode)
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return fmt.Errorf("stream reset: %v", f.ErrCode)
			}
		case *http2.HeadersFrame:
			if f.StreamID == id && f.StreamEnded() {
				return nil
			}
		case *http2.DataFrame:
			if f.StreamID == id && f.StreamEnded() {
				return nil
			}
		}
	}
}
