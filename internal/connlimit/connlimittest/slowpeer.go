package connlimittest

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// SlowPeer is a raw HTTP/2 client that behaves as a well-formed peer does,
// honouring flow control and answering SETTINGS and PINGs (so keepalive
// never drops it), but sends each gRPC request message only in part: the
// 5-byte header announces size bytes and all but the last byte follow. A
// server that reads messages as they arrive holds what it received until
// the message ends, so this is what a peer does to pin the server's
// memory.
type SlowPeer struct {
	t      testing.TB
	fr     *http2.Framer
	scheme string
	wmu    sync.Mutex // framer writes

	mu         sync.Mutex
	cond       *sync.Cond
	settings   bool
	initWin    int64
	maxStreams uint32
	connWin    int64
	streamWin  map[uint32]int64
	ended      map[uint32]string // stream -> how it ended (RST_STREAM, status)
	goaway     string
	readErr    error
	sent       int64 // DATA bytes written
	pings      uint64
	acked      map[[8]byte]bool // PINGs the server has acknowledged
}

// NewSlowPeer starts HTTP/2 on conn (a *tls.Conn negotiated to h2, or a
// plaintext connection) and waits for the server's SETTINGS.
func NewSlowPeer(t testing.TB, conn net.Conn) *SlowPeer {
	t.Helper()
	p := &SlowPeer{t: t, fr: http2.NewFramer(conn, conn), scheme: "http", initWin: 65535, connWin: 65535,
		maxStreams: 1 << 31, streamWin: map[uint32]int64{}, ended: map[uint32]string{}, acked: map[[8]byte]bool{}}
	if _, ok := conn.(*tls.Conn); ok {
		p.scheme = "https"
	}
	p.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	p.cond = sync.NewCond(&p.mu)
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := p.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	go p.read()
	deadline := time.Now().Add(10 * time.Second)
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.settings && p.readErr == nil && time.Now().Before(deadline) {
		p.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
		p.mu.Lock()
	}
	if !p.settings {
		t.Fatalf("no SETTINGS from the server: %v", p.readErr)
	}
	return p
}

func (p *SlowPeer) read() {
	for {
		f, err := p.fr.ReadFrame()
		p.mu.Lock()
		if err != nil {
			p.readErr = err
			p.cond.Broadcast()
			p.mu.Unlock()
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = f.ForeachSetting(func(s http2.Setting) error {
					switch s.ID {
					case http2.SettingInitialWindowSize:
						d := int64(s.Val) - p.initWin
						p.initWin = int64(s.Val)
						for id := range p.streamWin {
							p.streamWin[id] += d
						}
					case http2.SettingMaxConcurrentStreams:
						p.maxStreams = s.Val
					}
					return nil
				})
				p.settings = true
				p.wmu.Lock()
				_ = p.fr.WriteSettingsAck()
				p.wmu.Unlock()
			}
		case *http2.PingFrame:
			if f.IsAck() {
				p.acked[f.Data] = true
			} else {
				p.wmu.Lock()
				_ = p.fr.WritePing(true, f.Data)
				p.wmu.Unlock()
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				p.connWin += int64(f.Increment)
			} else {
				p.streamWin[f.StreamID] += int64(f.Increment)
			}
		case *http2.RSTStreamFrame:
			if p.ended[f.StreamID] == "" {
				p.ended[f.StreamID] = "RST_STREAM " + f.ErrCode.String()
			}
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() {
				p.ended[f.StreamID] = fmt.Sprintf("grpc-status %s (%s)", value(f, "grpc-status"), value(f, "grpc-message"))
			}
		case *http2.GoAwayFrame:
			p.goaway = fmt.Sprintf("GOAWAY %s last stream %d: %s", f.ErrCode, f.LastStreamID, f.DebugData())
		}
		p.cond.Broadcast()
		p.mu.Unlock()
	}
}

func value(f *http2.MetaHeadersFrame, name string) string {
	for _, h := range f.RegularFields() {
		if h.Name == name {
			return h.Value
		}
	}
	return ""
}

// Settings returns the server's initial stream window and its cap on
// concurrent streams (1<<31 if it sent none).
func (p *SlowPeer) Settings() (initialWindow int64, maxStreams uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.initWin, p.maxStreams
}

// send writes data on stream as flow control allows.
func (p *SlowPeer) send(stream uint32, data []byte) error {
	for len(data) > 0 {
		p.mu.Lock()
		for (p.connWin <= 0 || p.streamWin[stream] <= 0) && p.readErr == nil && p.ended[stream] == "" && p.goaway == "" {
			p.cond.Wait()
		}
		if p.readErr != nil || p.ended[stream] != "" || p.goaway != "" {
			err := fmt.Errorf("stream %d: read %v, ended %q, %s", stream, p.readErr, p.ended[stream], p.goaway)
			p.mu.Unlock()
			return err
		}
		n := min(int64(len(data)), p.connWin, p.streamWin[stream], 16384)
		p.connWin -= n
		p.streamWin[stream] -= n
		p.sent += n
		p.mu.Unlock()
		p.wmu.Lock()
		err := p.fr.WriteData(stream, false, data[:n])
		p.wmu.Unlock()
		if err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// OpenPartial opens stream (odd, increasing) with a gRPC call of path and
// sends, as flow control allows, a message header announcing size bytes
// and size-1 of them.
func (p *SlowPeer) OpenPartial(stream uint32, path string, size int) error {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", p.scheme}, {":path", path}, {":authority", "localhost"},
		{"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	p.mu.Lock()
	p.streamWin[stream] = p.initWin
	p.mu.Unlock()
	p.wmu.Lock()
	err := p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: hb.Bytes(), EndHeaders: true})
	p.wmu.Unlock()
	if err != nil {
		return err
	}
	go func() {
		msg := make([]byte, 5+size-1)
		binary.BigEndian.PutUint32(msg[1:5], uint32(size))
		_ = p.send(stream, msg) // a stream the server ends stops here
	}()
	return nil
}

// OpenHeaderBlock opens stream with a header block that never ends: one
// header whose value is announced at size bytes, fed but for its last
// byte over CONTINUATION frames (nothing else may be sent on the
// connection meanwhile, so the peer's acknowledgements wait). It returns
// how much of the value it sent before the server stopped it.
func (p *SlowPeer) OpenHeaderBlock(stream uint32, size int) (int, error) {
	// Literal without indexing, new name "x-pad", value of size bytes
	// (an integer with a 7-bit prefix).
	blk := []byte{0x00, 0x05, 'x', '-', 'p', 'a', 'd', 0x7f}
	for n := size - 127; ; n /= 128 {
		if n < 128 {
			blk = append(blk, byte(n))
			break
		}
		blk = append(blk, byte(n%128|0x80))
	}
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if err := p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: blk}); err != nil {
		return 0, err
	}
	chunk := bytes.Repeat([]byte{'a'}, 16384)
	sent := 0
	for ; sent+len(chunk) < size; sent += len(chunk) {
		if err := p.fr.WriteContinuation(stream, false, chunk); err != nil {
			return sent, err
		}
	}
	return sent, nil
}

// OpenWithHeader opens stream (odd, increasing) with a complete header
// block of a gRPC call of path that carries one more header, x-pad, of pad
// bytes, over a HEADERS frame and CONTINUATION frames of at most 16 KiB,
// and sends nothing else: what a server does with a header list of that
// size, before any message.
func (p *SlowPeer) OpenWithHeader(stream uint32, path string, pad int) error {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", p.scheme}, {":path", path}, {":authority", "localhost"},
		{"content-type", "application/grpc"}, {"te", "trailers"}, {"x-pad", string(bytes.Repeat([]byte{'a'}, pad))}} {
		_ = enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	p.mu.Lock()
	p.streamWin[stream] = p.initWin
	p.mu.Unlock()
	p.wmu.Lock()
	defer p.wmu.Unlock()
	blk := hb.Bytes()
	const frame = 16384
	first := blk[:min(frame, len(blk))]
	blk = blk[len(first):]
	if err := p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: first, EndHeaders: len(blk) == 0}); err != nil {
		return err
	}
	for len(blk) > 0 {
		next := blk[:min(frame, len(blk))]
		blk = blk[len(next):]
		if err := p.fr.WriteContinuation(stream, len(blk) == 0, next); err != nil {
			return err
		}
	}
	return nil
}

// Ping sends a PING and waits up to d for the server to acknowledge it. A
// server reads a connection's frames in order, so once it has, it has
// read every frame sent before the PING: the HEADERS of every stream
// opened so far, and whatever it does on reading them (grpc-go's tap
// handle, for one).
func (p *SlowPeer) Ping(d time.Duration) error {
	var data [8]byte
	p.mu.Lock()
	p.pings++
	binary.BigEndian.PutUint64(data[:], p.pings)
	p.mu.Unlock()
	p.wmu.Lock()
	err := p.fr.WritePing(false, data)
	p.wmu.Unlock()
	if err != nil {
		return err
	}
	for deadline := time.Now().Add(d); ; time.Sleep(5 * time.Millisecond) {
		p.mu.Lock()
		acked, readErr := p.acked[data], p.readErr
		p.mu.Unlock()
		switch {
		case acked:
			return nil
		case readErr != nil:
			return fmt.Errorf("no PING ACK: %w", readErr)
		case time.Now().After(deadline):
			return fmt.Errorf("no PING ACK within %s", d)
		}
	}
}

// Sent returns how many bytes of messages the server has let it send.
func (p *SlowPeer) Sent() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent
}

// Ended returns how stream ended ("" while it is open).
func (p *SlowPeer) Ended(stream uint32) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ended[stream]
}

// AwaitEnded waits up to d for stream to end and returns how it did ("" if
// it is still open).
func (p *SlowPeer) AwaitEnded(stream uint32, d time.Duration) string {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if why := p.Ended(stream); why != "" {
			return why
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p.Ended(stream)
}

// Open counts the streams opened with OpenPartial or OpenWithHeader that
// the server has not ended, and says how the last ended one did (and why
// the connection ended, if it did).
func (p *SlowPeer) Open() (open int, why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id := range p.streamWin {
		if p.ended[id] == "" {
			open++
		} else {
			why = p.ended[id]
		}
	}
	if p.goaway != "" {
		why += "; " + p.goaway
	}
	if p.readErr != nil {
		open = 0 // the connection, and every stream on it, is gone
		why += fmt.Sprintf("; connection: %v", p.readErr)
	}
	return open, why
}
