package decisionlog

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// strs are the strings random decisions are made of: every class of
// character encoding/json escapes, invalid UTF-8, multi-byte runes, and
// the line and paragraph separators.
var strs = []string{
	"", "a", "/api/v1/items", "spiffe://td/ns/a/sa/b", "10.0.0.1", `quo"te`, `back\slash`,
	"ctl\x00\x01\x1f\x7f", "tab\tnl\nlf\rff\fbs\b", "<html>&amp;", "ünïcødé ✓ 𝄞", "bad\xffutf8\xc3", "\xed\xa0\x80",
	"sep\u2028and\u2029", "/users/alice?token=s3cret&page=2", "/x?flag&y=1#frag", "/a?%70age=3&=v",
	"GET", "host.example:8080", "x-request-id", "Content-Type", "Bearer eyJhbGci", "ns/policy-7",
	"pathnorm: path rejected: \"users/bob\"", "sha256:0123abcd",
}

func pick(r *rand.Rand) string {
	if r.IntN(8) == 0 {
		// Any bytes at all.
		b := make([]byte, r.IntN(12))
		for i := range b {
			b[i] = byte(r.UintN(256))
		}
		return string(b)
	}
	return strs[r.IntN(len(strs))]
}

func randomPeer(r *rand.Rand) *authv3.AttributeContext_Peer {
	switch r.IntN(4) {
	case 0:
		return nil
	case 1:
		return &authv3.AttributeContext_Peer{Principal: pick(r)}
	}
	return &authv3.AttributeContext_Peer{
		Principal: pick(r),
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: pick(r), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 443},
		}}},
	}
}

func randomRequest(r *rand.Rand) *authv3.CheckRequest {
	if r.IntN(10) == 0 {
		return &authv3.CheckRequest{}
	}
	a := &authv3.AttributeContext{Source: randomPeer(r), Destination: randomPeer(r)}
	if r.IntN(5) > 0 {
		h := &authv3.AttributeContext_HttpRequest{Method: pick(r), Host: pick(r), Path: pick(r)}
		if n := r.IntN(6); n > 0 {
			h.Headers = make(map[string]string, n)
			for range n {
				h.Headers[pick(r)] = pick(r)
			}
		}
		a.Request = &authv3.AttributeContext_Request{Http: h}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func randomInt(r *rand.Rand) *int {
	if r.IntN(2) == 0 {
		return nil
	}
	n := r.IntN(2000) - 1000
	return &n
}

func randomDecision(r *rand.Rand) *engine.Decision {
	d := &engine.Decision{
		Allowed: r.IntN(2) == 0, HTTPStatus: []int{0, 403, 401, 500}[r.IntN(4)],
		Reason: pick(r), Policy: pick(r), Rule: randomInt(r), Action: pick(r), Error: pick(r),
		PolicyVersion: []uint64{0, 1, 1 << 63}[r.IntN(3)], PolicyDigest: pick(r),
		// Not logged: the encoder must leave them out as the json tags do.
		Headers: []engine.Header{{Key: "k", Value: "v"}}, Body: pick(r), Applied: r.IntN(3),
	}
	switch r.IntN(3) {
	case 1:
		d.Audit = []engine.Match{}
	case 2:
		for range 1 + r.IntN(3) {
			d.Audit = append(d.Audit, engine.Match{Policy: pick(r), Rule: r.IntN(5) - 1})
		}
	}
	if r.IntN(3) == 0 {
		d.DryRun = &engine.Shadow{Allowed: r.IntN(2) == 0, Reason: pick(r), Policy: pick(r), Rule: randomInt(r)}
	}
	return d
}

// TestEncoderMatchesEncodingJSON: the hand-written encoder writes, for
// every decision, exactly the bytes encoding/json wrote for the Entry
// before it (json.Marshal of Logger.Entry). Dropping the HTML escape of
// '<' from appendStringBody, or sorting no header names, makes it fail.
func TestEncoderMatchesEncodingJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 14))
	for _, cfg := range []Config{
		{},
		{QueryAllowlist: []string{"page"}, HeaderAllowlist: []string{"X-Request-Id", "content-type"}, RedactPaths: []string{`^/users/([^/]+)`, `users/([^/"]+)`}},
	} {
		var id string
		cfg.Writer = &bytes.Buffer{}
		cfg.NewID = func() string { return id }
		l, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		enc := &encoder{l: l}
		for i := range 20000 {
			id = pick(r)
			at := time.Unix(r.Int64N(1<<35), r.Int64N(1e9)).In(time.FixedZone("x", 3600*(r.IntN(5)-2)))
			if i%7 == 0 {
				at = at.Truncate(time.Second)
			}
			req, d := randomRequest(r), randomDecision(r)
			want, err := json.Marshal(l.Entry(at, req, d))
			if err != nil {
				t.Fatal(err)
			}
			got, err := enc.appendLine(nil, at, req, d)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("decision %d:\n got %s\nwant %s", i, got, want)
			}
		}
	}
}

func TestEncoderRefusesYearsJSONRefuses(t *testing.T) {
	l, err := New(Config{Writer: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
	if _, err := json.Marshal(l.Entry(at, httpReq("/", nil), &engine.Decision{})); err == nil {
		t.Fatal("encoding/json accepted year 10000")
	}
	if _, err := (&encoder{l: l}).appendLine(nil, at, httpReq("/", nil), &engine.Decision{}); err == nil {
		t.Fatal("the encoder accepted year 10000")
	}
}

var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// TestDefaultIDsAreRandomUUIDs: without Config.NewID, decision ids are
// distinct version-4 UUIDs, across refills of the random block.
func TestDefaultIDsAreRandomUUIDs(t *testing.T) {
	var ids idSource
	seen := map[string]bool{}
	for range 3 * len(ids.buf) / 16 {
		id := string(ids.appendUUID(nil))
		if !uuidV4.MatchString(id) {
			t.Fatalf("id %q is not a version-4 UUID", id)
		}
		if seen[id] {
			t.Fatalf("id %q twice", id)
		}
		seen[id] = true
	}
}

// TestEncoderAllocatesNothing: a line costs no allocation on the common
// path, which is a request with headers and no query string, whether
// allowed or denied. Building the Entry and calling encoding/json, as Run
// did before, allocates about 15 times per line.
func TestEncoderAllocatesNothing(t *testing.T) {
	l, err := New(Config{Writer: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	enc := &encoder{l: l}
	rule := 0
	req := httpReq("/api/v1/items/42", map[string]string{
		"x-request-id": "f81d4fae", "user-agent": "curl/8", "authorization": "Bearer x", ":authority": "h", "accept": "*/*",
	})
	buf := make([]byte, 0, 4096)
	at := time.Date(2026, 12, 6, 3, 0, 0, 123456789, time.UTC)
	for _, d := range []*engine.Decision{
		{Allowed: true, Reason: engine.ReasonAllowMatched, Policy: "ns/allow", Rule: &rule, Action: "ALLOW", PolicyVersion: 3, PolicyDigest: "sha256:ab"},
		{HTTPStatus: 403, Reason: engine.ReasonNoAllowMatched, PolicyVersion: 3, PolicyDigest: "sha256:ab"},
	} {
		if n := testing.AllocsPerRun(1000, func() {
			var err error
			if buf, err = enc.appendLine(buf[:0], at, req, d); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("allowed=%v: %v allocs per line, want 0", d.Allowed, n)
		}
	}
}

// slowWriter takes delay per Write, whatever its size, as a disk whose
// every write waits; it counts lines.
type slowWriter struct {
	delay time.Duration
	mu    sync.Mutex
	lines int
}

func (w *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(w.delay)
	w.mu.Lock()
	w.lines += bytes.Count(p, []byte{'\n'})
	w.mu.Unlock()
	return len(p), nil
}

// TestNoDropsAtLoadWithASlowWriter: 16 callers log 10,000 decisions/s
// for a second, through a queue of 1,024, into a writer that takes 5 ms
// per write: at one line per write (200 lines/s) it could not keep up.
// Batching makes it keep up: no line is dropped, and every line is
// written and counted. Flushing after each line, as Run did before when
// its queue was momentarily empty, makes it drop thousands.
func TestNoDropsAtLoadWithASlowWriter(t *testing.T) {
	w := &slowWriter{delay: 5 * time.Millisecond}
	l, err := New(Config{Writer: w, QueueSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	const callers, perCaller, rate = 16, 625, 10000
	var logged atomic.Uint64
	var wg sync.WaitGroup
	start := time.Now()
	for c := range callers {
		wg.Go(func() {
			req := httpReq("/api/items", map[string]string{"x-request-id": "r", "authorization": "Bearer x"})
			d := &engine.Decision{Allowed: c%2 == 0, Reason: "r", Policy: "ns/p"}
			// Paced: caller c's calls are callers/rate apart, from c/rate.
			// A caller that falls behind (the machine stalled the test)
			// catches up by at most 20 ms of calls, not in one burst of
			// everything the stall held back, which no writer's batch
			// has to absorb at the load this test claims.
			due := start.Add(time.Duration(c) * time.Second / rate)
			for range perCaller {
				if wait := time.Until(due); wait > 0 {
					time.Sleep(wait)
				} else if -wait > 20*time.Millisecond {
					due = time.Now().Add(-20 * time.Millisecond)
				}
				due = due.Add(callers * time.Second / rate)
				l.Log(req, d)
				logged.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := l.Dropped(); got != 0 {
		t.Fatalf("dropped %d of %d decisions logged in %v", got, logged.Load(), elapsed)
	}
	if l.Written() != callers*perCaller || w.lines != callers*perCaller {
		t.Fatalf("written %d (writer saw %d lines), want %d", l.Written(), w.lines, callers*perCaller)
	}
}

// TestLogCopiesTheDecision: the caller may reuse its Decision once Log
// returns (extauthz pools them); the line is the decision as it was.
func TestLogCopiesTheDecision(t *testing.T) {
	var buf bytes.Buffer
	l, err := New(Config{Writer: &buf})
	if err != nil {
		t.Fatal(err)
	}
	d := &engine.Decision{Allowed: true, Reason: "first", Policy: "ns/first"}
	l.Log(httpReq("/", nil), d)
	*d = engine.Decision{Reason: "second"}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"allowed":true,"reason":"first","policy":"ns/first"`) {
		t.Fatalf("line %s is not the decision logged", buf.String())
	}
}

// countingWriter counts writes and lines.
type countingWriter struct {
	mu            sync.Mutex
	writes, lines int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.writes++
	w.lines += bytes.Count(p, []byte{'\n'})
	w.mu.Unlock()
	return len(p), nil
}

// TestFlushIntervalCoalescesWrites: a steady 10,000 decisions/s for
// 200 ms with a 20 ms FlushInterval makes about 10 writes, not one per
// decision or few; every line is still written. Writing as soon as a line
// is queued (a negative FlushInterval, Run's behaviour before) makes
// hundreds.
func TestFlushIntervalCoalescesWrites(t *testing.T) {
	w := &countingWriter{}
	l, err := New(Config{Writer: w, FlushInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	req := httpReq("/api/items", nil)
	d := &engine.Decision{Allowed: true, Reason: "r"}
	const n, rate = 2000, 10000
	start := time.Now()
	for i := range n {
		if wait := time.Duration(i)*time.Second/rate - time.Since(start); wait > 0 {
			time.Sleep(wait)
		}
		l.Log(req, d)
	}
	elapsed := time.Since(start)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// One write per interval, one more at the start and one at the end;
	// twice that for a slow scheduler.
	limit := 2 * (int(elapsed/(20*time.Millisecond)) + 2)
	if w.lines != n || l.Dropped() != 0 {
		t.Fatalf("%d lines written, %d dropped, want %d and 0", w.lines, l.Dropped(), n)
	}
	if w.writes > limit {
		t.Fatalf("%d writes for %d lines in %v, want at most %d", w.writes, n, elapsed, limit)
	}
}

// BenchmarkLine compares a line's cost: the Entry through encoding/json,
// as Run wrote it before, and the encoder Run uses.
func BenchmarkLine(b *testing.B) {
	l, err := New(Config{Writer: &bytes.Buffer{}})
	if err != nil {
		b.Fatal(err)
	}
	rule := 0
	req := httpReq("/api/v1/items/42", map[string]string{
		"x-request-id": "f81d4fae", "user-agent": "curl/8", "authorization": "Bearer x", ":authority": "h", "accept": "*/*",
	})
	d := &engine.Decision{Allowed: true, Reason: engine.ReasonAllowMatched, Policy: "ns/allow", Rule: &rule, Action: "ALLOW", PolicyVersion: 3, PolicyDigest: "sha256:ab"}
	at := time.Date(2026, 12, 6, 3, 0, 0, 123456789, time.UTC)
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := json.Marshal(l.Entry(at, req, d)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoder", func(b *testing.B) {
		enc := &encoder{l: l}
		buf := make([]byte, 0, 4096)
		b.ReportAllocs()
		for b.Loop() {
			if buf, err = enc.appendLine(buf[:0], at, req, d); err != nil {
				b.Fatal(err)
			}
		}
	})
}
