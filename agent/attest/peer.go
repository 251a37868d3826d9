package attest

import "sync"

// Peer is the process at the other end of a connection, pinned at the
// handshake. Its handles are released when the connection closes; after
// that Attest fails and Alive is false.
type Peer struct {
	t *transport

	mu     sync.RWMutex
	closed bool
	pid    int32
	pidfd  int    // -1 in the SO_PEERCRED fallback
	dir    int    // /proc/PID opened as a directory
	start  uint64 // start time, in clock ticks after boot
}

// PID is the peer's process id, in the reader's PID namespace.
func (p *Peer) PID() int32 { return p.pid }

// Pidfd reports whether the peer is pinned by a pidfd (SO_PEERPIDFD) rather
// than by SO_PEERCRED and its start time.
func (p *Peer) Pidfd() bool { return p.pidfd >= 0 }
