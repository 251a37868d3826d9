package journal

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// walIndex tells a lookup, without a query, that no transaction has been
// committed to an SQLite journal since it last read the log's size.
//
// SQLite in WAL mode keeps a wal-index in the database's "-shm" file. Its
// first 96 bytes are two copies of a 48-byte header that every commit, by
// any connection of any process, rewrites (second copy first, then the
// first); it counts the transactions and holds the WAL's frame count,
// salts and checksum (https://www.sqlite.org/walformat.html). If the header
// reads the same as it did before a read that found the log and the ledger
// the same size, nothing was appended since, so the ledger still holds the
// whole log: a token, enrolment or revocation written elsewhere would have
// changed it.
//
// SQLite deletes the file when its last connection closes and rebuilds it
// when a connection opens the database first; hold keeps one connection
// open, with the wal-index mapped, for as long as the file is read, so
// that neither can happen under it. Anything unexpected (a short read, the
// two copies differing while a commit writes them, an uninitialised or
// unknown header) makes the lookup read the log as before.
//
// The file is SQLite's, locked by it with POSIX record locks, which the
// kernel drops for the whole process when the process closes any
// descriptor of the file. So the descriptor read here is opened once per
// process and file and never closed (shmFile), and before it is used it
// must show SQLite's lock on it (liveShm), which proves it is the file
// SQLite maps and not, say, a stale one beside a symlink.
type walIndex struct {
	f    *os.File
	hold *sql.Conn

	mu   sync.Mutex
	seen walHeader
	size uint64 // at least the log's size when seen was read
	ok   bool
}

// walHeader is one copy of the wal-index header.
type walHeader [48]byte

// walIndexVersion is the header's iVersion field (WALINDEX_MAX_VERSION).
const walIndexVersion = 3007000

// openWALIndex opens the wal-index of the SQLite database at path, which
// db must be in WAL mode. It returns nil when the file cannot be used, and
// why; lookups then read the log's size every time.
func openWALIndex(ctx context.Context, db *sql.DB, path string) (*walIndex, error) {
	// SQLite names the file after the database's path with symlinks
	// resolved.
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, err
	}
	hold, err := db.Conn(ctx)
	if err != nil {
		return nil, err
	}
	// A read maps the connection's wal-index, which creates the file if
	// this is the database's first connection, and takes the lock that
	// keeps it.
	var one int
	if err := hold.QueryRowContext(ctx, `SELECT 1 FROM meta LIMIT 1`).Scan(&one); err != nil && !errors.Is(err, sql.ErrNoRows) {
		hold.Close()
		return nil, err
	}
	f, err := shmFile(real + "-shm")
	if err == nil {
		err = liveShm(f)
	}
	if err != nil {
		hold.Close()
		return nil, err
	}
	return &walIndex{f: f, hold: hold}, nil
}

// header reads the wal-index header; ok is false unless both copies agree
// and say the index is initialised and of the version described above.
func (w *walIndex) header() (h walHeader, ok bool) {
	var b [2 * len(walHeader{})]byte
	if n, _ := w.f.ReadAt(b[:], 0); n != len(b) {
		return h, false
	}
	first, second := b[:len(h)], b[len(h):]
	// iVersion is in the machine's byte order; isInit is byte 12.
	if !bytes.Equal(first, second) || first[12] != 1 || binary.NativeEndian.Uint32(first) != walIndexVersion {
		return h, false
	}
	copy(h[:], first)
	return h, true
}

// unchanged says whether h is the header last recorded and the ledger,
// with have entries, holds as many as the log did then: then no commit
// came since, and the log is as long as the ledger.
func (w *walIndex) unchanged(h walHeader, have uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ok && w.seen == h && have >= w.size
}

// record notes that h was read before a read of the log that found size
// entries, and that the ledger holds them all.
func (w *walIndex) record(h walHeader, size uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.seen, w.size, w.ok = h, size, true
}

// ownCommit records the header after a commit of this process's, which
// made the log size entries long, the ledger holding them all; locked is
// the header read under that commit's write lock, before it. Without it,
// the first lookup after each of the journal's own commits would read the
// log's size: under load, every lookup. It records only if the header now
// counts exactly one transaction more than locked (its iChange, which
// SQLite increments once per commit, and only then): that one is this
// commit, and no other came after it. A checkpoint that restarts the WAL
// changes the header without a commit, and appends nothing.
func (w *walIndex) ownCommit(locked walHeader, size uint64) {
	h, ok := w.header()
	if ok && h.change() == locked.change()+1 {
		w.record(h, size)
	}
}

// change is the header's iChange: the count of transactions committed.
func (h walHeader) change() uint32 { return binary.NativeEndian.Uint32(h[8:12]) }

// close releases the held connection. The file stays open (shmFile).
func (w *walIndex) close() error {
	if err := w.hold.Close(); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// shmFiles are the wal-index files this process has opened, by device and
// inode, never closed: see walIndex.
var shmFiles struct {
	mu sync.Mutex
	m  map[fileID]*os.File
}

// shmFile returns this process's descriptor of the file name, opening it
// the first time.
func shmFile(name string) (*os.File, error) {
	id, err := idOf(name)
	if err != nil {
		return nil, err
	}
	shmFiles.mu.Lock()
	defer shmFiles.mu.Unlock()
	if f, ok := shmFiles.m[id]; ok {
		return f, nil
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	if shmFiles.m == nil {
		shmFiles.m = map[fileID]*os.File{}
	}
	// Kept even if the file was replaced between the stat and the open:
	// closing it could drop SQLite's locks. Keyed by what was opened.
	opened, err := fileIDOf(f)
	if err != nil {
		shmFiles.m[id] = f // unknown: never close it, never use it
		return nil, err
	}
	shmFiles.m[opened] = f
	if opened != id {
		return nil, fmt.Errorf("%s was replaced while it was opened", name)
	}
	return f, nil
}
