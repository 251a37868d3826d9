// Package node is the node agent, trustmesh node (ambient mode): one per
// node, it holds the identities of every workload on its node. It
// authenticates to the CA as the node, asks which identities the node may
// hold (the CA's entries), generates each workload's key in memory, obtains
// the certificates with batched, delegated issuance, and serves them on one
// unix socket to the local processes that attestation matches to them.
//
// The parts: the node's own credential (its SVID off Kubernetes, renewed by
// agent/rotation, or its service-account token on Kubernetes), the bundle
// follower, the Holder (entries and workload SVIDs), the socket server
// (serve.go) and monitoring.
package node

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// Entry is one identity the node may hold and the selectors a local caller
// must all match to receive it (cav1.Selector* form).
type Entry struct {
	ID        spiffeid.ID
	Selectors []string
}

// NodeCA is the CA's node service, as the node calls it
// (caclient.NodeClient).
type NodeCA interface {
	FetchEntries(ctx context.Context) (*cav1.FetchEntriesResponse, error)
	BatchNewX509SVID(ctx context.Context, params []*cav1.NewX509SVIDParams) ([]*cav1.NewX509SVIDResult, error)
}

// BundleSource is the node's own identity store, whose bundle the workload
// identities share. A change in it (the node's SVID arriving) also retries
// a failed fetch of the entries at once.
type BundleSource interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// Defaults of HolderConfig.
const (
	DefaultSyncInterval    = 5 * time.Second
	DefaultRefreshInterval = 500 * time.Millisecond
	// RenewalWindow is the share of a certificate's lifetime by which a
	// renewal may be brought forward so that it joins a batch.
	RenewalWindow = 0.1
	// batchConcurrency bounds the BatchNewX509SVID calls in flight.
	batchConcurrency = 4
	// maxBatchBytes bounds one BatchNewX509SVID request's encoded size,
	// below the CA's 256 KiB gRPC receive limit: 500 long Kubernetes IDs
	// (each in the param and again in its CSR) exceed it, and the CA
	// refuses the whole call with ResourceExhausted.
	maxBatchBytes = 224 << 10
)

// Issuance results, the label values of
// trustmesh_node_issuance_results_total.
const (
	ResultIssued    = "issued"
	ResultNotOnNode = "not_on_node"
	ResultRefused   = "refused"
	ResultInvalid   = "invalid_certificate"
	ResultFailed    = "failed"
)

// HolderConfig configures a Holder.
type HolderConfig struct {
	CA NodeCA
	// Bundle is the node's store; its bundle verifies every workload
	// certificate and is handed to the workloads.
	Bundle BundleSource
	// NodeName, if set, must be the node the CA says it authenticated.
	NodeName string
	Clock    clock.Clock
	// KeyType of the workload keys; default svid.ECP256.
	KeyType svid.KeyType
	// TTL asked for; zero lets the CA choose.
	TTL time.Duration
	// SyncInterval between FetchEntries calls; default DefaultSyncInterval.
	SyncInterval time.Duration
	// RefreshInterval is the least time between two fetches that Refresh
	// asks for; default DefaultRefreshInterval.
	RefreshInterval time.Duration
	// Backoff paces retries of failed issuance.
	Backoff backoff.Backoff
	// CallTimeout bounds one call to the CA; default 30s.
	CallTimeout time.Duration
	Logger      *slog.Logger
	// Registerer receives the holder's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// held is one identity the node holds or is getting.
type held struct {
	id    spiffeid.ID
	store *identity.Store
	// svid is the current certificate; nil until issued.
	svid *x509svid.SVID
	// due is when to (re)issue: zero for at once.
	due time.Time
	// window is how early the renewal may be brought forward.
	window time.Duration
	// published says Store(id) returns store.
	published bool
	// err is why its last issuance failed and will be retried; nil once
	// it is held again. Health is made of these.
	err error
}

// Holder keeps every identity the node holds: the entries from the CA and,
// for each distinct identity, an in-memory key and its certificate. It
// satisfies Identities.
type Holder struct {
	cfg HolderConfig

	mu       sync.Mutex
	entries  []Entry
	revision string
	fetched  bool
	changed  chan struct{}
	held     map[spiffeid.ID]*held
	// refused are identities the CA refused for good (not on the node,
	// or a refusal no retry can change), asked for again only when the
	// entries' revision changes.
	refused map[spiffeid.ID]string
	bundle  *x509bundle.Bundle
	// fetch bookkeeping for Refresh: requested counts fetches asked for,
	// completed the fetches done, lastErr the error of the last one.
	requested, completed uint64
	lastErr              error
	fetchDone            chan struct{}
	entriesErr           error

	kickFetch chan struct{}
	kickIssue chan struct{}

	// firstFull is when every identity of the first entries was first
	// held; zero until then. started is when Run started.
	started, firstFull time.Time

	heldGauge prometheus.GaugeFunc
	batches   prometheus.Counter
	results   *prometheus.CounterVec
	fetches   *prometheus.CounterVec
	fullSecs  prometheus.GaugeFunc
}

// NewHolder checks cfg and returns a holder; Run makes it work.
func NewHolder(cfg HolderConfig) (*Holder, error) {
	var errs []error
	if cfg.CA == nil {
		errs = append(errs, errors.New("node: holder: CA is required"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("node: holder: Bundle is required"))
	}
	if cfg.Clock == nil {
		errs = append(errs, errors.New("node: holder: Clock is required"))
	}
	if cfg.TTL < 0 {
		errs = append(errs, fmt.Errorf("node: holder: negative TTL %s", cfg.TTL))
	}
	if cfg.KeyType == "" {
		cfg.KeyType = svid.ECP256
	} else if _, err := svid.ParseKeyType(string(cfg.KeyType)); err != nil {
		errs = append(errs, fmt.Errorf("node: holder: %w", err))
	}
	if cfg.SyncInterval < 0 || cfg.RefreshInterval < 0 {
		errs = append(errs, errors.New("node: holder: negative interval"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.SyncInterval == 0 {
		cfg.SyncInterval = DefaultSyncInterval
	}
	if cfg.RefreshInterval == 0 {
		cfg.RefreshInterval = DefaultRefreshInterval
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Holder{
		cfg:       cfg,
		changed:   make(chan struct{}),
		held:      map[spiffeid.ID]*held{},
		refused:   map[spiffeid.ID]string{},
		fetchDone: make(chan struct{}),
		kickFetch: make(chan struct{}, 1),
		kickIssue: make(chan struct{}, 1),
		batches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_node_batch_calls_total",
			Help: "BatchNewX509SVID calls made to the CA.",
		}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_issuance_results_total",
			Help: "Workload certificates asked for, by result.",
		}, []string{"result"}),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_entry_fetches_total",
			Help: "FetchEntries calls made to the CA, by result (ok or failed).",
		}, []string{"result"}),
	}
	h.heldGauge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "trustmesh_node_identities_held",
		Help: "Workload identities the node holds a valid certificate for.",
	}, func() float64 { return float64(h.Held()) })
	h.fullSecs = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "trustmesh_node_first_full_issuance_seconds",
		Help: "Seconds from start until every identity of the first entries was held; 0 until then.",
	}, func() float64 { return h.FirstFullIssuance().Seconds() })
	for _, r := range []string{ResultIssued, ResultNotOnNode, ResultRefused, ResultInvalid, ResultFailed} {
		h.results.WithLabelValues(r)
	}
	h.fetches.WithLabelValues("ok")
	h.fetches.WithLabelValues("failed")
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{h.heldGauge, h.batches, h.results, h.fetches, h.fullSecs} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("node: holder: register metrics: %w", err)
			}
		}
	}
	return h, nil
}

// Entries returns the current entries, sorted by ID, and a channel closed at
// the next change: of the entries, or of which identities are held.
func (h *Holder) Entries() ([]Entry, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.entries, h.changed
}

// Store returns the store of id, or nil while the node holds no certificate
// for it.
func (h *Holder) Store(id spiffeid.ID) *identity.Store {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e := h.held[id]; e != nil && e.published {
		return e.store
	}
	return nil
}

// Held returns how many identities have a certificate.
func (h *Holder) Held() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, e := range h.held {
		if e.svid != nil {
			n++
		}
	}
	return n
}

// FirstFullIssuance returns how long after Run started every identity of
// the first entries was held; zero until then.
func (h *Holder) FirstFullIssuance() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.firstFull.IsZero() {
		return 0
	}
	return h.firstFull.Sub(h.started)
}

// Healthy returns nil while the node has its entries and no identity it
// holds or is getting has a failed issuance waiting for its retry, else
// why not. An identity the CA refused for good is dropped, not held, and
// does not count: retrying cannot help, and the entries' next revision
// asks again.
func (h *Holder) Healthy() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.entriesErr != nil:
		return fmt.Errorf("cannot fetch the node's entries: %w", h.entriesErr)
	case !h.fetched:
		return errors.New("no entries fetched yet")
	}
	var (
		failing int
		first   *held
	)
	for _, e := range h.held {
		if e.err == nil {
			continue
		}
		failing++
		if first == nil || e.id.String() < first.id.String() {
			first = e
		}
	}
	if failing > 0 {
		return fmt.Errorf("workload certificates: %d failing, retried; first: %w", failing, first.err)
	}
	return nil
}

// Refresh fetches the entries now, or waits for a fetch that started after
// the call, and returns its error. Fetches are at least RefreshInterval
// apart; concurrent callers share one.
func (h *Holder) Refresh(ctx context.Context) error {
	h.mu.Lock()
	target := h.requested + 1
	h.mu.Unlock()
	select {
	case h.kickFetch <- struct{}{}:
	default:
	}
	for {
		h.mu.Lock()
		done, completed, err := h.fetchDone, h.completed, h.lastErr
		h.mu.Unlock()
		if completed >= target {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-done:
		}
	}
}

// Run fetches entries and issues and renews certificates until ctx ends;
// it returns ctx.Err().
func (h *Holder) Run(ctx context.Context) error {
	h.mu.Lock()
	h.started = h.cfg.Clock.Now()
	h.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); h.followBundle(ctx) }()
	go func() { defer wg.Done(); h.issueLoop(ctx) }()
	h.syncLoop(ctx)
	wg.Wait()
	h.mu.Lock()
	for id, e := range h.held {
		h.drop(id, e)
	}
	h.mu.Unlock()
	return ctx.Err()
}

// followBundle hands the node's bundle to every workload store.
func (h *Holder) followBundle(ctx context.Context) {
	for {
		snap, changed := h.cfg.Bundle.Load()
		h.mu.Lock()
		if snap.Bundle != h.bundle {
			h.bundle = snap.Bundle
			for _, e := range h.held {
				e.store.SetBundle(snap.Bundle)
			}
		}
		failing := h.entriesErr != nil
		h.mu.Unlock()
		h.kick()
		if failing {
			// The node's credential may just have arrived: fetch again
			// rather than wait for the next interval.
			select {
			case h.kickFetch <- struct{}{}:
			default:
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

func (h *Holder) kick() {
	select {
	case h.kickIssue <- struct{}{}:
	default:
	}
}

// syncLoop fetches the entries every SyncInterval and when asked.
func (h *Holder) syncLoop(ctx context.Context) {
	var last time.Time
	for {
		h.mu.Lock()
		h.requested++
		h.mu.Unlock()
		last = h.cfg.Clock.Now()
		err := h.fetch(ctx)
		if ctx.Err() != nil {
			return
		}
		h.mu.Lock()
		h.completed = h.requested
		h.lastErr = err
		close(h.fetchDone)
		h.fetchDone = make(chan struct{})
		h.mu.Unlock()

		t := h.cfg.Clock.NewTimer(h.cfg.SyncInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		case <-h.kickFetch:
			t.Stop()
			if wait := h.cfg.RefreshInterval - h.cfg.Clock.Since(last); wait > 0 {
				rt := h.cfg.Clock.NewTimer(wait)
				select {
				case <-ctx.Done():
					rt.Stop()
					return
				case <-rt.C():
				}
			}
		}
	}
}

// fetch gets the entries and brings the held identities in line.
func (h *Holder) fetch(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	resp, err := h.cfg.CA.FetchEntries(cctx)
	cancel()
	if err == nil && h.cfg.NodeName != "" && resp.GetNode() != h.cfg.NodeName {
		err = fmt.Errorf("node: the CA authenticated this node as %q, not %q", resp.GetNode(), h.cfg.NodeName)
	}
	var entries []Entry
	if err == nil {
		entries, err = parseEntries(resp.GetEntries())
	}
	if err != nil {
		h.fetches.WithLabelValues("failed").Inc()
		if ctx.Err() == nil {
			h.cfg.Logger.Warn("cannot fetch the node's entries", "error", err)
		}
		h.mu.Lock()
		h.entriesErr = err
		h.mu.Unlock()
		return err
	}
	h.fetches.WithLabelValues("ok").Inc()
	h.apply(entries, resp.GetRevision())
	return nil
}

func parseEntries(in []*cav1.Entry) ([]Entry, error) {
	out := make([]Entry, 0, len(in))
	for _, e := range in {
		id, err := spiffeid.FromString(e.GetSpiffeId())
		if err != nil {
			return nil, fmt.Errorf("node: entry %q: %w", e.GetSpiffeId(), err)
		}
		if len(e.GetSelectors()) == 0 {
			return nil, fmt.Errorf("node: entry %s has no selectors", id)
		}
		out = append(out, Entry{ID: id, Selectors: slices.Clone(e.GetSelectors())})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out, nil
}

// apply installs entries: new identities are issued at once, identities no
// longer listed are dropped with their keys.
func (h *Holder) apply(entries []Entry, revision string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.entriesErr = nil
	if h.fetched && revision != "" && revision == h.revision {
		return
	}
	h.fetched = true
	if revision != h.revision {
		clear(h.refused)
	}
	h.revision = revision
	want := map[spiffeid.ID]bool{}
	for _, e := range entries {
		want[e.ID] = true
	}
	for id, e := range h.held {
		if !want[id] {
			h.cfg.Logger.Info("identity left the node's entries; dropping it and its key", "spiffe_id", id.String())
			h.drop(id, e)
		}
	}
	added := 0
	for id := range want {
		if _, ok := h.held[id]; ok {
			continue
		}
		if _, ok := h.refused[id]; ok {
			continue
		}
		st := identity.New()
		if h.bundle != nil {
			st.SetBundle(h.bundle)
		}
		h.held[id] = &held{id: id, store: st}
		added++
	}
	h.entries = entries
	h.checkFull()
	h.notify()
	if added > 0 {
		h.kick()
	}
}

// drop forgets id: its store loses its certificate (and so streams learn),
// its key is gone. h.mu is held.
func (h *Holder) drop(id spiffeid.ID, e *held) {
	if e.svid != nil {
		e.store.SetSVID(nil)
	}
	delete(h.held, id)
	if e.published {
		h.notify()
	}
}

// notify closes the change channel. h.mu is held.
func (h *Holder) notify() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// issueLoop wakes at the earliest due time and issues every identity due
// within its window, in batches.
func (h *Holder) issueLoop(ctx context.Context) {
	bo := h.cfg.Backoff
	for {
		now := h.cfg.Clock.Now()
		due, next := h.collect(now)
		if len(due) > 0 {
			issued := h.issue(ctx, due)
			if ctx.Err() != nil {
				return
			}
			if issued {
				bo.Reset()
			} else {
				retry := now.Add(bo.Next())
				h.mu.Lock()
				for _, e := range due {
					// Renewals brought forward keep their own due time.
					if h.held[e.id] == e && !e.due.After(now) {
						e.due = retry
						if e.svid != nil {
							e.due = minTime(retry, svid.Expiry(e.svid))
						}
					}
				}
				h.mu.Unlock()
			}
			continue
		}
		var (
			t  clock.Timer
			tc <-chan time.Time
		)
		if !next.IsZero() {
			t = h.cfg.Clock.NewTimer(next.Sub(now))
			tc = t.C()
		}
		select {
		case <-ctx.Done():
		case <-tc:
		case <-h.kickIssue:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// collect withdraws expired certificates and returns the identities to
// issue now, and otherwise when the next one is due. Nothing is issued
// before the node has a bundle to verify with.
func (h *Holder) collect(now time.Time) (due []*held, next time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.bundle == nil {
		return nil, time.Time{}
	}
	for _, e := range h.held {
		if e.svid != nil && !now.Before(svid.Expiry(e.svid)) {
			h.cfg.Logger.Error("certificate expired without renewal; withdrawing it", "spiffe_id", e.id.String())
			e.svid = nil
			e.store.SetSVID(nil)
		}
		if !e.due.After(now) {
			due = append(due, e)
		} else if next.IsZero() || e.due.Before(next) {
			next = e.due
		}
	}
	if len(due) == 0 {
		return nil, next
	}
	// Coalesce: bring forward every renewal due within its window.
	for _, e := range h.held {
		if e.due.After(now) && e.svid != nil && !e.due.After(now.Add(e.window)) {
			due = append(due, e)
		}
	}
	sort.Slice(due, func(i, j int) bool { return due[i].id.String() < due[j].id.String() })
	return due, time.Time{}
}

type pending struct {
	e   *held
	key crypto.Signer
}

// issue asks for a certificate for each of due, in batches of at most
// cav1.MaxBatch, and reports whether every one got one (or was dropped).
func (h *Holder) issue(ctx context.Context, due []*held) bool {
	var (
		mu  sync.Mutex
		ok  = true
		wg  sync.WaitGroup
		sem = make(chan struct{}, batchConcurrency)
	)
	for start := 0; start < len(due); start += cav1.MaxBatch {
		chunk := due[start:min(start+cav1.MaxBatch, len(due))]
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := h.issueBatch(ctx, chunk); err != nil {
				mu.Lock()
				ok = false
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return ok
}

// failed records why e's issuance failed, for health, until it is held
// again or dropped.
func (h *Holder) failed(e *held, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.held[e.id] == e {
		e.err = err
	}
}

// refusedForGood reports whether a per-param refusal cannot change until
// the node's entries do: the node may not hold the identity (NOT_ON_NODE,
// PermissionDenied: reserved, a node identity, another trust domain,
// delegation off) or the request is one the CA will always refuse
// (InvalidArgument). Unavailable, Internal, ResourceExhausted and the rest
// are worth retrying.
func refusedForGood(c codes.Code, reason string) bool {
	return reason == cav1.NotOnNode || c == codes.PermissionDenied || c == codes.InvalidArgument
}

// issueBatch asks for chunk's certificates, in as many BatchNewX509SVID
// calls as keep each request within maxBatchBytes, and applies the results.
// It returns an error if any param needs a retry.
func (h *Holder) issueBatch(ctx context.Context, chunk []*held) error {
	ps := make([]pending, 0, len(chunk))
	params := make([]*cav1.NewX509SVIDParams, 0, len(chunk))
	for _, e := range chunk {
		key, err := svid.GenerateKey(h.cfg.KeyType)
		if err != nil {
			err = fmt.Errorf("node: %w", err)
			h.failed(e, err)
			return err
		}
		csrPEM, err := svid.NewCSR(key, e.id)
		if err != nil {
			err = fmt.Errorf("node: %w", err)
			h.failed(e, err)
			return err
		}
		block, _ := pem.Decode(csrPEM)
		ps = append(ps, pending{e: e, key: key})
		params = append(params, &cav1.NewX509SVIDParams{
			SpiffeId:   e.id.String(),
			Csr:        block.Bytes,
			TtlSeconds: int64(h.cfg.TTL / time.Second),
		})
	}
	var retry error
	for lo := 0; lo < len(params); {
		hi := lo + fitBatch(params[lo:], maxBatchBytes)
		if err := h.call(ctx, ps[lo:hi], params[lo:hi]); err != nil {
			retry = cmpErr(retry, err)
		}
		lo = hi
	}
	return retry
}

// fitBatch returns how many of params, at least one, fit in a
// BatchNewX509SVIDRequest of at most limit encoded bytes.
func fitBatch(params []*cav1.NewX509SVIDParams, limit int) int {
	size := 0
	for i, p := range params {
		// Each is a length-delimited field 1 of the request.
		size += protowire.SizeTag(1) + protowire.SizeBytes(proto.Size(p))
		if size > limit && i > 0 {
			return i
		}
	}
	return len(params)
}

// call makes one BatchNewX509SVID call and applies its results. It returns
// an error if any param needs a retry.
func (h *Holder) call(ctx context.Context, ps []pending, params []*cav1.NewX509SVIDParams) error {
	cctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	results, err := h.cfg.CA.BatchNewX509SVID(cctx, params)
	cancel()
	h.batches.Inc()
	if err == nil && len(results) != len(ps) {
		err = fmt.Errorf("node: %d results for %d params", len(results), len(ps))
	}
	if err != nil {
		for _, p := range ps {
			h.failed(p.e, err)
		}
		h.results.WithLabelValues(ResultFailed).Add(float64(len(ps)))
		if ctx.Err() == nil {
			h.cfg.Logger.Warn("batch issuance failed", "identities", len(ps), "error", err)
		}
		return err
	}
	var retry error
	h.mu.Lock()
	latest := h.bundle
	h.mu.Unlock()
	now := h.cfg.Clock.Now()
	for i, r := range results {
		p := ps[i]
		if c := codes.Code(r.GetCode()); c != codes.OK {
			if refusedForGood(c, r.GetReason()) {
				if r.GetReason() == cav1.NotOnNode {
					h.results.WithLabelValues(ResultNotOnNode).Inc()
					h.cfg.Logger.Warn("the CA says no workload of this identity runs on the node; dropping it until the entries change",
						"spiffe_id", p.e.id.String(), "message", r.GetMessage())
				} else {
					h.results.WithLabelValues(ResultRefused).Inc()
					h.cfg.Logger.Error("the CA refuses this identity to the node for good; dropping it until the entries change",
						"spiffe_id", p.e.id.String(), "code", c.String(), "reason", r.GetReason(), "message", r.GetMessage())
				}
				h.mu.Lock()
				if h.held[p.e.id] == p.e {
					h.refused[p.e.id] = h.revision
					h.drop(p.e.id, p.e)
					h.checkFull()
				}
				h.mu.Unlock()
				continue
			}
			err := fmt.Errorf("node: %s refused: %s: %s (%s)", p.e.id, c, r.GetMessage(), r.GetReason())
			h.failed(p.e, err)
			h.results.WithLabelValues(ResultRefused).Inc()
			h.cfg.Logger.Warn("workload certificate refused; will retry", "spiffe_id", p.e.id.String(),
				"code", c.String(), "reason", r.GetReason(), "message", r.GetMessage())
			retry = cmpErr(retry, err)
			continue
		}
		chain, err := parseDERChain(r.GetCertChain())
		var got *x509svid.SVID
		if err == nil {
			got, err = svid.Verify(svid.VerifyRequest{Chain: chain, Key: p.key, Bundle: latest, Want: p.e.id, Now: now})
		}
		if err != nil {
			h.cfg.Logger.Error("refusing a certificate from the CA", "spiffe_id", p.e.id.String(), "error", err)
			err = fmt.Errorf("node: %s: %w", p.e.id, err)
			h.failed(p.e, err) // before the metric: who sees the one sees the other
			h.results.WithLabelValues(ResultInvalid).Inc()
			retry = cmpErr(retry, err)
			continue
		}
		h.results.WithLabelValues(ResultIssued).Inc()
		h.store(p.e, got)
	}
	return retry
}

func cmpErr(have, err error) error {
	if have != nil {
		return have
	}
	return err
}

// store installs a verified certificate and schedules its renewal at half
// its lifetime.
func (h *Holder) store(e *held, got *x509svid.SVID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.held[e.id] != e {
		return // dropped meanwhile; the key goes with it
	}
	leaf := got.Certificates[0]
	life := svid.Expiry(got).Sub(leaf.NotBefore)
	e.svid = got
	// At half its lifetime; never sooner than a tenth of it from now, so
	// that a CA that backdates much cannot make the node renew in a loop.
	e.due = leaf.NotBefore.Add(life / 2)
	if floor := h.cfg.Clock.Now().Add(life / 10); e.due.Before(floor) {
		e.due = floor
	}
	e.window = time.Duration(RenewalWindow * float64(life))
	e.err = nil // held: healthy again, in the same step
	e.store.SetSVID(got)
	if !e.published {
		e.published = true
		h.notify()
	}
	h.checkFull()
}

// checkFull records the first time every identity is held. h.mu is held.
func (h *Holder) checkFull() {
	if !h.firstFull.IsZero() || !h.fetched {
		return
	}
	for _, o := range h.held {
		if o.svid == nil {
			return
		}
	}
	h.firstFull = h.cfg.Clock.Now()
	h.cfg.Logger.Info("every identity of the node held", "identities", len(h.held),
		"after", h.firstFull.Sub(h.started))
}

// parseDERChain decodes a result's chain: leaf first, then intermediates.
func parseDERChain(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("node: the CA returned no certificate")
	}
	chain := make([]*x509.Certificate, 0, len(ders))
	for _, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("node: the CA returned a malformed certificate: %w", err)
		}
		chain = append(chain, c)
	}
	return chain, nil
}
