package journal_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// turnCounter is a TCP proxy in front of PostgreSQL that counts round trips:
// each time the client sends after the server last spoke (or first) is one.
type turnCounter struct {
	ln net.Listener

	mu         sync.Mutex
	turns      int
	serverLast bool
}

func newTurnCounter(t *testing.T, target string) *turnCounter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &turnCounter{ln: ln, serverLast: true}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			client, err := ln.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				client.Close()
				continue
			}
			wg.Add(2)
			go func() { defer wg.Done(); p.copy(server, client, true); server.Close() }()
			go func() { defer wg.Done(); p.copy(client, server, false); client.Close() }()
		}
	}()
	return p
}

func (p *turnCounter) copy(dst io.Writer, src io.Reader, fromClient bool) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			if fromClient && p.serverLast {
				p.turns++
			}
			p.serverLast = !fromClient
			p.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *turnCounter) reset() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.turns
	p.turns = 0
	return n
}

// A commit of plain appends on PostgreSQL takes three round trips: [BEGIN,
// the append lock, the log's size, the largest checkpoint's size], [the
// rows], and [the signed checkpoint, COMMIT]. The rows have a round trip of
// their own so that the checkpoint is signed only once the database has
// taken them: a row INSERT that fails leaves no signed note on the wire. So
// does one that redeems a join token: its precondition reads the ledger,
// not the database. One that follows another replica's appends takes one
// more, to read them and the checkpoint that vouches for them.
func TestPostgresCommitTakesThreeRoundTrips(t *testing.T) {
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("needs PostgreSQL")
	}
	u, err := url.Parse(bs[1].dsn)
	if err != nil {
		t.Fatal(err)
	}
	p := newTurnCounter(t, u.Host)
	u.Host = p.ln.Addr().String()
	s := backend{name: "postgres", dsn: u.String()}.open(t)
	ctx := context.Background()
	const id = "spiffe://cluster.local/ns/rt/sa/a"
	// Warm up: the connection prepares each statement once.
	for i := range 3 {
		if _, err := s.RecordIssuance(ctx, renewal(fmt.Sprintf("warm-%d", i), id), nil); err != nil {
			t.Fatal(err)
		}
	}
	p.reset()
	const n = 20
	for i := range n {
		if _, err := s.RecordIssuance(ctx, renewal(fmt.Sprintf("rt-%d", i), id), nil); err != nil {
			t.Fatal(err)
		}
	}
	if got := p.reset(); got != 3*n {
		t.Errorf("%d sequential appends took %d round trips, want %d (3 per commit)", n, got, 3*n)
	}

	// A join token's creation and its redemption: ops with a precondition.
	hash := []byte("0123456789abcdef0123456789abcdef")
	if err := s.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "rt-tok", SPIFFEID: id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if got := p.reset(); got != 3 {
		t.Errorf("creating a join token took %d round trips, want 3", got)
	}
	iss := issuance("rt-redeem", id)
	iss.EnrolmentID = "rt-tok"
	if _, err := s.RecordIssuance(ctx, iss, &journal.Redemption{TokenHash: hash, TokenID: "rt-tok"}); err != nil {
		t.Fatal(err)
	}
	if got := p.reset(); got != 3 {
		t.Errorf("redeeming a join token took %d round trips, want 3", got)
	}

	// Another replica appends: the next commit catches its rows up, and
	// checks them against their signed checkpoint, in one more.
	other := bs[1].open(t)
	for round := range 2 {
		for i := range 3 {
			if _, err := other.RecordIssuance(ctx, renewal(fmt.Sprintf("other-%d-%d", round, i), id), nil); err != nil {
				t.Fatal(err)
			}
		}
		p.reset()
		if _, err := s.RecordIssuance(ctx, renewal(fmt.Sprintf("after-other-%d", round), id), nil); err != nil {
			t.Fatal(err)
		}
		// The first catch-up on a connection prepares its two statements.
		if got := p.reset(); round > 0 && got != 4 {
			t.Errorf("an append after another replica's took %d round trips, want 4", got)
		}
	}
	e, err := s.Entries(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if want := 3 + n + 2 + 2*(3+1); len(e) != want {
		t.Errorf("the log holds %d entries, want %d", len(e), want)
	}
}
