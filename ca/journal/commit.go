package journal

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/trustmesh/trustmesh/internal/tracing"
)

// pending is one entry an op appends.
type pending struct {
	kind     Kind
	time     time.Time
	spiffeID string
	serial   string
	body     []byte
}

// op is one append: a precondition (for example that a join token is
// unspent), checked against the ledger once the committer holds the append
// lock and has caught up with every other writer, then its entries. An op
// whose precondition fails appends nothing and does not fail the others in
// its batch.
type op struct {
	pre     func() error
	entries []pending
	// first is the index of the op's first entry, set on success.
	first uint64
	done  chan error
	// queued is when the op was queued; batch and waited, set by the
	// committer before done, are the size of the batch that committed it
	// and how long it waited in the queue before that batch began.
	queued time.Time
	batch  int
	waited time.Duration
}

// noSpan records nothing; ending it does nothing.
var noSpan = trace.SpanFromContext(context.Background())

// Tracing: the span of an op's wait and commit, a child of the caller's
// span (ca.Issue) when that one is recording.
const (
	tracerName     = "trustmesh/ca"
	SpanCommit     = "ca.journal.commit"
	AttrBatchSize  = "journal.batch_size"
	AttrWaitMillis = "journal.wait_ms"
)

// submit queues an op and waits until it is durable or has failed. An op
// with neither entries nor a precondition only catches up with what others
// appended, and needs no signer.
func (s *Store) submit(ctx context.Context, o *op) error {
	if s.cfg.Signer == nil && (o.pre != nil || len(o.entries) > 0) {
		return errors.New("journal: opened without a checkpoint signer; appends are disabled")
	}
	if err := s.Integrity(); err != nil {
		return err
	}
	span := noSpan
	if o.pre != nil || len(o.entries) > 0 {
		// An append, not a catch-up read.
		ctx, span = tracing.Child(ctx, tracerName, SpanCommit)
	}
	defer span.End()
	o.done = make(chan error, 1)
	submitted := s.cfg.Clock.Now()
	if err := s.enqueue(ctx, o); err != nil {
		span.SetStatus(codes.Error, "not queued")
		return err
	}
	// Once queued, wait for the outcome even if ctx ends: the caller must
	// know whether its entry is durable.
	err := <-o.done
	if err == nil && (o.pre != nil || len(o.entries) > 0) {
		s.metrics.observeAppend(s.cfg.Clock.Since(submitted))
	}
	if span.IsRecording() {
		span.SetAttributes(attribute.Int(AttrBatchSize, o.batch),
			attribute.Float64(AttrWaitMillis, float64(o.waited)/float64(time.Millisecond)))
		if err != nil {
			span.SetStatus(codes.Error, "not committed")
		}
	}
	return err
}

// enqueue queues o unless the store is closed. The read lock keeps Close
// from closing between the check and the send: an op queued after the
// committer drained the queue would wait forever.
func (s *Store) enqueue(ctx context.Context, o *op) error {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	select {
	case <-s.closed:
		return ErrClosed
	default:
	}
	o.queued = s.cfg.Clock.Now()
	select {
	case s.ops <- o:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Defaults for Config.CommitDelay and Config.CommitSiblings.
const (
	DefaultCommitDelay    = 2 * time.Millisecond
	DefaultCommitSiblings = 4
)

// commitLoop groups queued ops into batches: whatever queued while the
// previous batch committed goes into the next one, so the batch size follows
// the load. Under concurrent load, when the previous batch held at least
// CommitSiblings ops, a batch that holds fewer ops than the previous one is
// held open for up to CommitDelay until it holds as many: the callers the
// last commit released are on their way back. It is never held once it has
// that many, so a batch waits only for callers, never for a timer alone:
// without the wait, the first caller back takes a sync of its own and the
// batches alternate between one op and the rest.
//
// Waiting pays because a commit costs far more than an entry: an fsync, a
// signed checkpoint and a transaction, during which the committer's thread
// also holds one of the Go runtime's processors until the runtime notices
// the blocking call. Fewer, larger commits leave more CPU to the signing
// callers. A lone caller never waits: its batches hold one op, and the
// first op after the committer sat idle for longer than CommitDelay is
// treated as lone, whatever the batch before the pause held.
func (s *Store) commitLoop() {
	defer s.wg.Done()
	defer s.releaseWriter(false)
	for {
		first, idle, ok := s.next()
		if !ok {
			s.drain()
			return
		}
		if idle {
			s.lastBatch = 0
		}
		batch := s.fill([]*op{first})
		if s.cfg.CommitDelay > 0 && s.lastBatch >= s.cfg.CommitSiblings && len(batch) < s.lastBatch {
			// The callers of the last batch are coming back: wait for as
			// many as it held, not more, then take whatever else queued.
			batch = s.fill(s.wait(batch, s.lastBatch))
		}
		s.lastBatch = len(batch)
		s.commit(batch)
	}
}

// next returns the next op, and whether it found the committer idle for
// longer than CommitDelay since the last commit; ok is false once the store
// closes.
func (s *Store) next() (o *op, idle, ok bool) {
	// An op already queued goes before Close. Whether it was queued before
	// the committer came back for it or after, the committer was idle if
	// its last commit is older than the delay.
	select {
	case o := <-s.ops:
		return o, s.cfg.Clock.Since(s.lastCommit) > s.cfg.CommitDelay, true
	default:
	}
	select {
	case o := <-s.ops:
		return o, s.cfg.Clock.Since(s.lastCommit) > s.cfg.CommitDelay, true
	case <-s.closed:
		return nil, false, false
	}
}

// fill adds whatever is queued, up to MaxBatch, without waiting.
func (s *Store) fill(batch []*op) []*op {
	for len(batch) < s.cfg.MaxBatch {
		select {
		case o := <-s.ops:
			batch = append(batch, o)
		default:
			return batch
		}
	}
	return batch
}

// wait holds the batch open until it holds want ops (or MaxBatch),
// CommitDelay has passed or the store closes, whichever comes first.
// Durability is unchanged: every caller still returns only after the commit
// that holds its entry.
func (s *Store) wait(batch []*op, want int) []*op {
	want = min(want, s.cfg.MaxBatch)
	t := s.cfg.Clock.NewTimer(s.cfg.CommitDelay)
	defer t.Stop()
	for len(batch) < want {
		select {
		case o := <-s.ops:
			batch = append(batch, o)
		case <-t.C():
			return batch
		case <-s.closed:
			return batch
		}
	}
	return batch
}

// drain fails whatever is still queued at Close.
func (s *Store) drain() {
	for {
		select {
		case o := <-s.ops:
			o.done <- ErrClosed
		default:
			return
		}
	}
}

// commitTimeout bounds one commit, so that a hung database fails appends
// (and so issuances) instead of stalling them forever.
const commitTimeout = 30 * time.Second

func (s *Store) commit(batch []*op) {
	began := s.cfg.Clock.Now()
	for _, o := range batch {
		o.batch, o.waited = len(batch), began.Sub(o.queued)
	}
	// A journal found tampered with commits nothing more, not even ops
	// queued before it was found: the next batch would sign a tree of a
	// size whose note may just have been orphaned.
	if err := s.Integrity(); err != nil {
		for _, o := range batch {
			o.done <- err
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
	defer cancel()
	errs, note, err := s.commitBatch(ctx, batch)
	err = unavailable(err)
	// Before any caller learns its outcome, so that a caller's next append
	// is measured against this commit.
	s.lastCommit = s.cfg.Clock.Now()
	if errors.Is(err, ErrTampered) {
		s.setIntegrity(err)
	}
	s.noteAvailability(err)
	if err == nil {
		s.metrics.observeBatch(len(batch))
		// Before any caller learns its outcome, so that the clock guard
		// of its next issuance measures against this one.
		for i, o := range batch {
			if errs[i] != nil {
				continue
			}
			for _, e := range o.entries {
				if e.kind == KindIssuance {
					s.latest.raise(e.time)
				}
			}
		}
	}
	for i, o := range batch {
		switch {
		case err != nil:
			o.done <- err
		default:
			o.done <- unavailable(errs[i])
		}
	}
	if err == nil && note != nil && s.cfg.Witness != nil {
		s.cfg.Witness.Offer(note)
	}
}

// commitBatch writes a batch in one transaction: it takes the log's write
// lock, catches up with appends from elsewhere, stages the ops (stage), then
// stores the rows and the signed checkpoint over the new size. Either the
// whole transaction commits or the in-memory tree is put back. On SQLite the
// write lock is the transaction's own (BEGIN IMMEDIATE); PostgreSQL takes
// the three-round-trip pipeline (pipeline.go). Either way the rows are
// written before the checkpoint is signed, and a checkpoint row beyond the
// log's size is refused before it is (checkpointBeyond).
func (s *Store) commitBatch(ctx context.Context, batch []*op) (opErrs []error, signed []byte, err error) {
	if s.postgres {
		return s.commitPipelined(ctx, batch)
	}
	saved, err := copyRange(&s.hasher.f, s.rng)
	if err != nil {
		return nil, nil, err
	}
	savedLedger := s.ledger.size()
	defer func() {
		if err != nil {
			s.rng = saved
			s.ledger.truncate(savedLedger)
		}
	}()
	w, err := s.writerConn(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("journal: begin: %w", err)
	}
	defer func() {
		if err != nil {
			// The next commit opens a new connection: this one may be
			// the reason it failed.
			s.releaseWriter(true)
		}
	}()
	tx, err := w.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("journal: begin: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op
	// Under the write lock the transaction took at BEGIN: no other commit
	// can change the wal-index header until this one ends (ownCommit).
	var locked walHeader
	lockedOK := false
	if s.wal != nil {
		locked, lockedOK = s.wal.header()
	}
	before := s.rng.End()
	if err := s.catchUp(ctx, tx); err != nil {
		return nil, nil, err
	}
	var cpMax int64
	if err := tx.StmtContext(ctx, s.stmts.maxCheckpoint).QueryRowContext(ctx).Scan(&cpMax); err != nil {
		return nil, nil, fmt.Errorf("journal: %w", err)
	}
	if err := checkpointBeyond(cpMax, int64(s.rng.End())); err != nil {
		return nil, nil, err
	}
	vouched, err := s.vouch(s.rng.End() != before, func() error { return s.checkLatest(ctx, tx) })
	if err != nil {
		return nil, nil, err
	}
	if vouched {
		if saved, err = copyRange(&s.hasher.f, s.rng); err != nil {
			return nil, nil, err
		}
		savedLedger = s.ledger.size()
	}
	var buf rows
	opErrs, appendedHere, err := s.stage(batch, &buf)
	if err != nil {
		return nil, nil, err
	}
	if !appendedHere {
		// Nothing to sign; failed preconditions wrote nothing.
		return opErrs, nil, tx.Commit()
	}
	if err := s.flush(ctx, tx, &buf); err != nil {
		return nil, nil, err
	}
	cp, signed, err := s.sign()
	if err != nil {
		return nil, nil, err
	}
	if _, err := tx.StmtContext(ctx, s.stmts.insertCheckpoint).ExecContext(ctx,
		int64(cp.Size), cp.Root, signed, time.Now().UnixNano()); err != nil {
		return nil, nil, fmt.Errorf("journal: store checkpoint: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, nil, fmt.Errorf("journal: commit: %w", err)
	}
	s.ledger.publish()
	if lockedOK {
		s.wal.ownCommit(locked, s.ledger.publishedSize())
	}
	return opErrs, signed, nil
}

// writerConn is the connection SQLite commits are written on, kept from
// one commit to the next. SQLite keeps a page cache per connection and
// drops it whenever another connection wrote since its last transaction;
// on a connection only the committer writes on, the pages every commit
// touches (the trees' right edges, the indexes' leaves) stay cached until
// another process writes, where a connection from the pool (whichever a
// lookup last returned) reads them again from the file.
// Only the committer goroutine calls it.
func (s *Store) writerConn(ctx context.Context) (*sql.Conn, error) {
	if s.writer == nil {
		c, err := s.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		s.writer = c
	}
	return s.writer, nil
}

// releaseWriter gives up the commit connection: back to the pool when
// the committer stops, closed when discard is set (after a failed commit),
// so that the pool does not hand the same connection straight back.
func (s *Store) releaseWriter(discard bool) {
	if s.writer == nil {
		return
	}
	if discard {
		// database/sql closes a connection whose Raw call reports it bad.
		_ = s.writer.Raw(func(any) error { return driver.ErrBadConn })
	}
	_ = s.writer.Close()
	s.writer = nil
}

// vouch runs once a commit has caught up under the append lock. Rows
// written elsewhere (another replica, the CLI) count only when the latest
// signed checkpoint vouches for them: rows slipped in behind the journal's
// back are never signed into the log. After the database was out of reach
// the stored log is checked against its latest checkpoint (check) even when
// its size did not change: a commit whose outcome the lost connection hid,
// or a server restored from elsewhere, is found here rather than assumed
// away. vouched reports that check passed and the caught-up rows are
// published: they stay whatever becomes of the batch.
func (s *Store) vouch(appended bool, check func() error) (vouched bool, err error) {
	if appended || s.recheck {
		// Another writer may have issued: the clock guard reads the log
		// again rather than trust what it last read.
		s.latest.drop()
	}
	if appended && s.verifier == nil {
		return false, fmt.Errorf("%w: rows were appended elsewhere and no verifier key is set", ErrTampered)
	}
	if !appended && !(s.recheck && s.verifier != nil) {
		return false, nil
	}
	if err := check(); err != nil {
		return false, err
	}
	// They are durable and vouched for: lookups may rely on them.
	s.ledger.publish()
	return true, nil
}

// stage applies a batch to the in-memory log: each op's precondition,
// checked against the ledger as the batch's earlier ops left it, then its
// entries, whose rows go to buf. It returns each op's error and whether any
// entry was appended.
//
// The caller must hold the append lock and have caught up with every row
// another writer appended before it stages, and so before it signs (sign).
func (s *Store) stage(batch []*op, buf *rows) (opErrs []error, appended bool, err error) {
	start := s.rng.End()
	opErrs = make([]error, len(batch))
	for i, o := range batch {
		if o.pre != nil {
			if opErrs[i] = o.pre(); opErrs[i] != nil {
				continue
			}
		}
		// Nothing can fail but the in-memory append, which fails the
		// batch.
		if err := s.appendEntries(o, buf); err != nil {
			return nil, false, err
		}
	}
	return opErrs, s.rng.End() != start, nil
}

// sign signs the checkpoint over the in-memory log. The checkpoint key must
// never sign two different trees of one size, so the caller holds the
// append lock and has caught up with every other writer's rows (stage).
func (s *Store) sign() (Checkpoint, []byte, error) {
	root, err := s.rng.GetRootHash(nil)
	if err != nil {
		return Checkpoint{}, nil, fmt.Errorf("journal: root: %w", err)
	}
	cp := Checkpoint{Origin: s.cfg.Origin, Size: s.rng.End(), Root: root}
	signed, err := signCheckpoint(cp, s.cfg.Signer)
	if err != nil {
		return Checkpoint{}, nil, err
	}
	return cp, signed, nil
}

// noteAvailability logs when the database stops or starts taking commits,
// once per change, and after an outage arms the re-check of the stored log
// against its latest signed checkpoint (commitBatch). Only the committer
// calls it.
func (s *Store) noteAvailability(err error) {
	switch {
	case errors.Is(err, ErrUnavailable):
		if !s.recheck {
			s.cfg.Log.Error("journal: the database is unavailable; every issuance is refused until it takes commits again", "error", err)
		}
		s.recheck = true
	case err == nil && s.recheck:
		s.recheck = false
		s.cfg.Log.Info("journal: the database takes commits again", "size", s.rng.End(), "checked_against_checkpoint", s.verifier != nil)
	}
}

// appendEntries appends an op's entries to the in-memory range and ledger
// and buffers their rows; the caller writes them (flush) before the
// transaction commits.
func (s *Store) appendEntries(o *op, buf *rows) error {
	o.first = s.rng.End()
	for _, e := range o.entries {
		idx := s.rng.End()
		leaf := rfc6962.DefaultHasher.HashLeaf(e.body)
		buf.add(idx, e, leaf)
		if err := s.rng.Append(leaf, nil); err != nil {
			return fmt.Errorf("journal: append: %w", err)
		}
		if err := s.ledger.add(idx, leaf, e.body); err != nil {
			return err
		}
	}
	return nil
}

func copyRange(f *compact.RangeFactory, r *compact.Range) (*compact.Range, error) {
	hashes := make([][]byte, len(r.Hashes()))
	copy(hashes, r.Hashes())
	c, err := f.NewRange(r.Begin(), r.End(), hashes)
	if err != nil {
		return nil, fmt.Errorf("journal: copy range: %w", err)
	}
	return c, nil
}
