package xds

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"k8s.io/utils/clock"
)

// published is what a node is given: the go-control-plane snapshot (its
// per-resource versions, and `trustmesh xds dump`) and, per type, the
// version and the resources already marshaled, shared by every node and
// response of a generation.
type published struct {
	snap  cachev3.ResourceSnapshot
	types map[string]*typeSet
}

type typeSet struct {
	version string
	names   []string // sorted
	anys    map[string]*anypb.Any

	allOnce sync.Once
	all     []*anypb.Any // in the order of names
	// allSends counts the wildcard responses of the type; allEncoded is
	// all as a response's encoded resources (encoded.go), made for the
	// second. Guarded by the cache's mu.
	allSends   int
	allEncoded []byte

	// Delta (delta.go), guarded by the cache's mu: each resource's
	// version (the snapshot's version map); the delta resources every
	// response shares; the diffs to this set from others, by their id.
	versions map[string]string
	delta    map[string]*discoveryv3.Resource
	diffs    map[uint64]*deltaDiff
	id       uint64
}

// allAnys returns every resource of the type in the order of names, one
// slice that every wildcard response of the type shares (read only).
func (ts *typeSet) allAnys() []*anypb.Any {
	ts.allOnce.Do(func() {
		ts.all = make([]*anypb.Any, len(ts.names))
		for i, name := range ts.names {
			ts.all[i] = ts.anys[name]
		}
	})
	return ts.all
}

// encodedAll returns all the type's resources encoded for a wildcard
// response, or nil for the first one: a type that only one stream is
// sent (a pod with a configuration of its own) keeps no encoding besides
// its resources. c.mu is held.
func (ts *typeSet) encodedAll() []byte {
	if ts.allSends++; ts.allSends > 1 && ts.allEncoded == nil {
		ts.allEncoded = encodeResources(ts.allAnys())
	}
	return ts.allEncoded
}

// sentAll is the one entry of what a wildcard watch was returned: its
// value is the version of the type whose every resource was sent. The
// stream keeps it (go-control-plane's Subscription) instead of a map with
// an entry per resource, which at a thousand services and twenty
// thousand streams was most of the server's memory. go-control-plane
// deletes returned entries only when a request names resources without
// the wildcard, which ends the wildcard and deletes this one too: the
// next request is then answered, as a new subscription must be.
const sentAll = "\x00trustmesh/sent-all"

// cache serves state-of-the-world watches itself, answering from
// resources marshaled once per generation, so that ten thousand streams
// do not each hold a private marshaled copy of the same configuration.
// It serves delta watches too (delta.go), with per-stream state of a
// pointer to a shared generation.
//
// Every answer with a new version is marshaled by its stream and held in
// the transport until the client has read it; when thousands of proxies
// connect at once (a control plane restart), or a change reaches every
// proxy of the mesh, answering all of them at once would queue a copy per
// stream. So a node needs one of a fixed number of tokens before it is
// sent a new version (its first configuration, or a push), and gives it
// back once it has acknowledged (or rejected) every type it was sent, or
// goes away, or has held it for the hold time: a node that never
// acknowledges cannot keep a token, so streams that never acknowledge
// cannot starve the mesh of configuration. Nodes with a pushed version
// wait in order for a token (Istio's PILOT_PUSH_THROTTLE); their watches
// are answered with whatever version is current when their turn comes.
type cache struct {
	tokens chan struct{}
	done   chan struct{} // closed when the server stops: nobody waits for a token
	clock  clock.Clock
	hold   time.Duration

	mu    sync.Mutex
	nodes map[string]*sotwNode
	next  int64
	// held are the nodes holding a token.
	held map[*sotwNode]bool
	// queue are the nodes waiting for a token to be sent a new version,
	// in the order they started waiting; draining is whether a goroutine
	// takes back expired tokens for them.
	queue    []*sotwNode
	draining bool

	// nextTypeSet numbers typeSets.
	nextTypeSet uint64

	// streamsMu guards deltaReqs, the delta requests the stream
	// callbacks have seen and CreateDeltaWatch not yet, with their
	// stream, and deltas, the open delta streams (but not what they
	// hold, which is c.mu's), and their pending requests. It is taken
	// alone or inside c.mu.
	streamsMu sync.Mutex
	deltaReqs map[*discoveryv3.DeltaDiscoveryRequest]int64
	deltas    map[int64]*deltaStream
}

var _ cachev3.Cache = (*cache)(nil)

type sotwNode struct {
	pub      *published
	watches  map[int64]*sotwWatch
	dwatches map[int64]*deltaWatch
	// token is held from the first answer until every type in
	// unacked has been acknowledged, or until expires.
	token   bool
	expires time.Time
	unacked map[string]string // type -> version sent
	// queued is whether the node is in the cache's queue.
	queued bool
}

type sotwWatch struct {
	req *cachev3.Request
	sub cachev3.Subscription
	out chan cachev3.Response
}

// DefaultInitialPushes bounds the nodes receiving their first
// configuration at once; DefaultFirstPushHold is how long a node may hold
// its token without acknowledging.
const (
	DefaultInitialPushes = 256
	DefaultFirstPushHold = 10 * time.Second
)

func newCache(initial int, hold time.Duration, clk clock.Clock) *cache {
	if initial <= 0 {
		initial = DefaultInitialPushes
	}
	if hold <= 0 {
		hold = DefaultFirstPushHold
	}
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &cache{
		tokens:    make(chan struct{}, initial),
		done:      make(chan struct{}),
		clock:     clk,
		hold:      hold,
		nodes:     map[string]*sotwNode{},
		held:      map[*sotwNode]bool{},
		deltaReqs: map[*discoveryv3.DeltaDiscoveryRequest]int64{},
		deltas:    map[int64]*deltaStream{},
	}
}

// stop ends every wait for a token.
func (c *cache) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.done:
	default:
		close(c.done)
	}
}

// acquire waits for a first-answer token for node id, without holding c.mu
// while it waits (the stream's own goroutine waits, and it holds no token),
// and returns the node as it is once c.mu is held again: with the token,
// unless the cache stopped or another stream of the node got one first.
// While it waits, tokens held past their hold time are taken back.
// c.mu is held on entry and on return.
func (c *cache) acquire(id string) *sotwNode {
	got, stopped := false, false
	for !got && !stopped {
		c.expire()
		var expiry <-chan time.Time
		var t clock.Timer
		if next, ok := c.nextExpiry(); ok {
			t = c.clock.NewTimer(next.Sub(c.clock.Now()))
			expiry = t.C()
		}
		c.mu.Unlock()
		select {
		case c.tokens <- struct{}{}:
			got = true
		case <-c.done:
			stopped = true
		case <-expiry:
		}
		if t != nil {
			t.Stop()
		}
		c.mu.Lock()
	}
	n := c.node(id)
	switch {
	case !got:
	case n.token:
		<-c.tokens // another stream of the node got one first
	default:
		c.take(n)
	}
	return n
}

// take gives n the token its caller put in c.tokens. c.mu is held.
func (c *cache) take(n *sotwNode) {
	n.token, n.unacked, n.expires = true, map[string]string{}, c.clock.Now().Add(c.hold)
	c.held[n] = true
	if len(c.queue) > 0 {
		c.drain()
	}
}

// expire takes back the tokens held past their hold time. c.mu is held.
func (c *cache) expire() {
	now := c.clock.Now()
	for n := range c.held {
		if !now.Before(n.expires) {
			c.release(n)
		}
	}
}

// nextExpiry is when the next held token expires. c.mu is held.
func (c *cache) nextExpiry() (time.Time, bool) {
	var next time.Time
	for n := range c.held {
		if next.IsZero() || n.expires.Before(next) {
			next = n.expires
		}
	}
	return next, !next.IsZero()
}

// release gives the node's token back; the caller then calls dispatch.
// c.mu is held.
func (c *cache) release(n *sotwNode) {
	if n.token {
		n.token = false
		n.unacked = nil
		delete(c.held, n)
		<-c.tokens
	}
}

// stale reports whether a watch of n waits for a version other than the
// one n has. c.mu is held.
func (c *cache) stale(n *sotwNode) bool {
	if n.pub == nil {
		return false
	}
	for _, w := range n.watches {
		if ts := n.pub.types[w.req.GetTypeUrl()]; ts != nil && ts.version != w.req.GetVersionInfo() {
			return true
		}
	}
	return false
}

// push sends n's current version to its watches that lack it, if n holds
// a token or one is free; otherwise n waits in the queue. c.mu is held.
func (c *cache) push(n *sotwNode) {
	if !c.stale(n) {
		return
	}
	if !n.token {
		c.expire()
		c.dispatch()
		select {
		case c.tokens <- struct{}{}:
			c.take(n)
		default:
			if !n.queued {
				n.queued = true
				c.queue = append(c.queue, n)
				c.drain()
			}
			return
		}
	}
	for wid, w := range n.watches {
		ts := n.pub.types[w.req.GetTypeUrl()]
		if ts == nil || ts.version == w.req.GetVersionInfo() {
			continue
		}
		c.sent(n, w, ts)
		delete(n.watches, wid)
	}
}

// dispatch gives free tokens to the nodes waiting in the queue, in order,
// and sends them their current version; nodes that went away or were
// answered meanwhile are dropped from it. c.mu is held.
func (c *cache) dispatch() {
	for len(c.queue) > 0 {
		n := c.queue[0]
		if n.token || !c.stale(n) {
			n.queued = false
			c.queue[0] = nil
			c.queue = c.queue[1:]
			if n.token {
				c.push(n)
			}
			continue
		}
		select {
		case c.tokens <- struct{}{}:
		default:
			return
		}
		n.queued = false
		c.queue[0] = nil
		c.queue = c.queue[1:]
		c.take(n)
		c.push(n)
	}
	c.queue = nil
}

// drain starts, unless one runs, a goroutine that takes back the tokens
// held past their hold time while nodes wait in the queue, so that nodes
// that never acknowledge cannot stall a push. c.mu is held.
func (c *cache) drain() {
	if c.draining {
		return
	}
	c.draining = true
	go func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for {
			c.expire()
			c.dispatch()
			next, ok := c.nextExpiry()
			if len(c.queue) == 0 || !ok {
				// Nothing waits, or no token is held to expire: a node
				// that takes one restarts the drain (take).
				c.draining = false
				return
			}
			t := c.clock.NewTimer(next.Sub(c.clock.Now()))
			c.mu.Unlock()
			select {
			case <-t.C():
				c.mu.Lock()
			case <-c.done:
				t.Stop()
				c.mu.Lock()
				c.draining = false
				return
			}
		}
	}()
}

func (c *cache) node(id string) *sotwNode {
	n := c.nodes[id]
	if n == nil {
		n = &sotwNode{watches: map[int64]*sotwWatch{}, dwatches: map[int64]*deltaWatch{}}
		c.nodes[id] = n
	}
	return n
}

// set publishes a node's configuration to delta and state-of-the-world
// watches.
func (c *cache) set(id string, pub *published) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	n.pub = pub
	c.push(n)
	for wid, w := range n.dwatches {
		if c.deltaRespond(w, pub) {
			delete(n.dwatches, wid)
		}
	}
	return nil
}

// sent answers a watch, noting what the node must acknowledge while it
// holds a token. c.mu is held.
func (c *cache) sent(n *sotwNode, w *sotwWatch, ts *typeSet) {
	if n.token {
		n.unacked[w.req.GetTypeUrl()] = ts.version
	}
	respond(w, ts)
}

// clear forgets a node.
func (c *cache) clear(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		return
	}
	c.release(n)
	if len(n.watches) == 0 && len(n.dwatches) == 0 {
		delete(c.nodes, id)
	} else {
		n.pub = nil
	}
	c.dispatch()
}

// CreateWatch answers at once when the node's configuration is newer than
// the request's, or holds a resource the client subscribes to and has not
// been sent; otherwise it waits for the next set.
func (c *cache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	if err := subscriptionBound(req.GetTypeUrl(), sub); err != nil {
		return nil, err
	}
	id := req.GetNode().GetId()
	c.mu.Lock()
	n := c.node(id)
	if n.token && req.GetResponseNonce() != "" {
		// An acknowledgement or a rejection of what the node was sent.
		if v, ok := n.unacked[req.GetTypeUrl()]; ok && (v == req.GetVersionInfo() || req.GetErrorDetail() != nil) {
			delete(n.unacked, req.GetTypeUrl())
		}
		if len(n.unacked) == 0 {
			c.release(n)
			c.dispatch()
		}
	}
	if !n.token && len(n.unacked) == 0 && req.GetVersionInfo() == "" && n.pub != nil && n.pub.types[req.GetTypeUrl()] != nil {
		// A first answer: it waits for a token.
		n = c.acquire(id)
	}
	defer c.mu.Unlock()
	if n.pub != nil {
		if ts := n.pub.types[req.GetTypeUrl()]; ts != nil && ts.version == req.GetVersionInfo() && unsent(ts, sub) {
			// A wider subscription at the version the node has.
			c.sent(n, &sotwWatch{req: req, sub: sub, out: out}, ts)
			return func() {}, nil
		}
	}
	c.next++
	wid := c.next
	n.watches[wid] = &sotwWatch{req: req, sub: sub, out: out}
	// Answered now if it lacks the node's version and a token is held or
	// free; otherwise when the node's turn in the queue comes.
	c.push(n)
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if n := c.nodes[id]; n != nil {
			delete(n.watches, wid)
			if len(n.watches) == 0 && len(n.dwatches) == 0 && n.pub == nil {
				delete(c.nodes, id)
			}
		}
	}, nil
}

// CreateDeltaWatch throttles first answers as CreateWatch does, then
// answers at once if the node's configuration holds something the
// stream's client lacks, or waits for the next set (delta.go).
func (c *cache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, out chan cachev3.DeltaResponse) (func(), error) {
	if err := subscriptionBound(req.GetTypeUrl(), sub); err != nil {
		return nil, err
	}
	id, typ := req.GetNode().GetId(), req.GetTypeUrl()
	c.mu.Lock()
	ds, err := c.deltaStreamOf(req)
	if err != nil {
		c.mu.Unlock()
		return nil, err
	}
	_, seen := ds.known[typ]
	k := deltaUpdate(ds, req, sub)
	n := c.node(id)
	if n.token && req.GetResponseNonce() != "" {
		delete(n.unacked, typ)
		if len(n.unacked) == 0 {
			c.release(n)
			c.dispatch()
		}
	}
	first := req.GetResponseNonce() == "" && !seen && k.at == nil && len(k.over) == 0
	if first && !n.token && n.pub != nil {
		n = c.acquire(id)
	}
	if first && n.token {
		n.unacked[typ] = ""
	}
	defer c.mu.Unlock()
	w := &deltaWatch{stream: ds, req: req, typ: typ, sub: sub, out: out, first: !seen}
	if n.pub != nil && c.deltaRespond(w, n.pub) {
		return func() {}, nil
	}
	c.next++
	wid := c.next
	n.dwatches[wid] = w
	return func() {
		if w.answered.Load() {
			// set answered it and dropped it from the node.
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if n := c.nodes[id]; n != nil {
			delete(n.dwatches, wid)
			if len(n.watches) == 0 && len(n.dwatches) == 0 && n.pub == nil {
				delete(c.nodes, id)
			}
		}
	}, nil
}

// MaxSubscribedNames bounds the resource names one stream may subscribe
// to per type. go-control-plane keeps every name a client subscribes, and
// each request and push of a named stream walks them under the cache's
// lock, so without a bound one workload's stream could delay every other
// node's configuration. A sidecar names at most the clusters it was sent,
// far fewer than this.
const MaxSubscribedNames = 1 << 16

// subscriptionBound refuses, ending the stream, a subscription to more
// than MaxSubscribedNames names of one type.
func subscriptionBound(typ string, sub cachev3.Subscription) error {
	if n := len(sub.SubscribedResources()); n > MaxSubscribedNames {
		return status.Errorf(codes.ResourceExhausted, "xds: a stream may subscribe to at most %d resources of %s, not %d", MaxSubscribedNames, typ, n)
	}
	return nil
}

// Fetch refuses: only ADS streams are served.
func (c *cache) Fetch(context.Context, *cachev3.Request) (cachev3.Response, error) {
	return nil, errors.New("xds: only ADS streams are served")
}

// unsent reports whether a subscribed resource exists that the client has
// not been sent.
func unsent(ts *typeSet, sub cachev3.Subscription) bool {
	returned := sub.ReturnedResources()
	if sub.IsWildcard() {
		return returned[sentAll] != ts.version
	}
	for name := range sub.SubscribedResources() {
		if _, ok := ts.anys[name]; ok {
			if _, sent := returned[name]; !sent {
				return true
			}
		}
	}
	return false
}

// respond sends the subscribed resources of a type. The response shares
// the marshaled resources, and a wildcard response the list of them too;
// only the response itself is the stream's own (the server sets the nonce
// on it), with what it returned: the resources of a named subscription,
// or sentAll for a wildcard one. c.mu is held.
func respond(w *sotwWatch, ts *typeSet) {
	var (
		resources []*anypb.Any
		returned  map[string]string
		encoded   []byte
	)
	if w.sub.IsWildcard() {
		resources = ts.allAnys()
		encoded = ts.encodedAll()
		returned = map[string]string{sentAll: ts.version}
	} else {
		var names []string
		for name := range w.sub.SubscribedResources() {
			if _, ok := ts.anys[name]; ok {
				names = append(names, name)
			}
		}
		sort.Strings(names)
		resources = make([]*anypb.Any, len(names))
		returned = make(map[string]string, len(names))
		for i, name := range names {
			resources[i] = ts.anys[name]
			returned[name] = ts.version
		}
	}
	resp := &discoveryv3.DiscoveryResponse{VersionInfo: ts.version, Resources: resources, TypeUrl: w.req.GetTypeUrl()}
	if encoded != nil {
		// The shared encoding instead of the stream's own (encoded.go).
		resp.Resources = nil
		resp.ProtoReflect().SetUnknown(encoded)
	}
	// The channel holds one response and each watch gets one.
	w.out <- &cachev3.PassthroughResponse{
		Request:           w.req,
		DiscoveryResponse: resp,
		ReturnedResources: returned,
	}
}
