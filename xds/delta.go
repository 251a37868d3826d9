package xds

import (
	"errors"
	"slices"
	"strings"
	"sync/atomic"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// Delta streams are answered here, not by go-control-plane's snapshot
// cache, which keeps per stream and type a map with the version of every
// resource the client holds (thousands of entries per stream at a
// thousand services) and diffs each stream's map against the snapshot on
// every push. Here what a stream's client holds of a type is a pointer to
// the typeSet it was last sent all of (deltaKnown.at), plus a small
// overlay of the exceptions; a push from G to G' is diffed once per pair
// of typeSets (typeSet.diffFrom) and every stream at G gets the same
// pre-built resources.
//
// go-control-plane's delta server stores the map a response returns
// (GetNextVersionMap) in the stream's subscription and writes to it when a
// request unsubscribes: it deletes the name, or sets it to "" when a
// wildcard subscription unsubscribes a name it had named. So no map is
// shared: each response returns a fresh empty map, the server's writes
// land there, and CreateDeltaWatch reads them back into the overlay when
// it handles the request that caused them.

// deltaAbsent in an overlay marks a resource the client does not hold.
const deltaAbsent = "\x00trustmesh/absent"

// deltaKnown is what one delta stream's client holds of one type: every
// resource of at (nil: none) at at's version, except where over says
// otherwise (a version, "" for one that must be sent again or removed, or
// deltaAbsent).
type deltaKnown struct {
	at   *typeSet
	over map[string]string
}

// held is the version of name the client holds.
func (k *deltaKnown) held(name string) (string, bool) {
	if v, ok := k.over[name]; ok {
		return v, v != deltaAbsent
	}
	if k.at != nil {
		v, ok := k.at.versions[name]
		return v, ok
	}
	return "", false
}

// deltaDiff is what a client that holds every resource of one typeSet
// (or none) is sent to hold every resource of another.
type deltaDiff struct {
	upserts []*discoveryv3.Resource // new or changed, in name order
	removed []string                // in name order
	added   []string                // names new in the target
	// sends counts the responses that sent all of upserts; encoded are
	// upserts as a response's encoded resources (encoded.go), made for
	// the second.
	sends   int
	encoded []byte
}

// encodedUpserts returns the diff's upserts encoded for a response that
// sends them all, or nil for the first such response: a diff that only
// one stream is sent (a pod with a configuration of its own) keeps no
// encoding besides its resources. c.mu is held.
func (d *deltaDiff) encodedUpserts() []byte {
	if d.sends++; d.sends > 1 && d.encoded == nil {
		d.encoded = encodeDeltaResources(d.upserts)
	}
	return d.encoded
}

// deltaStream is one delta stream's state: what its client holds, by
// type. c.mu guards known; c.streamsMu guards pending, as it guards the
// c.deltas map that holds the stream.
type deltaStream struct {
	known map[string]*deltaKnown
	// pending is the request the callbacks saw last, until
	// CreateDeltaWatch takes it (go-control-plane may refuse a request in
	// between, and the stream then ends).
	pending *discoveryv3.DeltaDiscoveryRequest
}

type deltaWatch struct {
	stream *deltaStream
	req    *cachev3.DeltaRequest
	// typ is req's type URL, kept here so that a push passes over a
	// watch of a type it did not change without reading req.
	typ string
	sub cachev3.Subscription
	out chan cachev3.DeltaResponse
	// first is whether req is the stream's first of its type: a wildcard
	// one is answered even with nothing in it, or Envoy would not
	// finish initializing.
	first bool
	// answered is set, under c.mu, once a set answered the watch and
	// dropped it from its node: go-control-plane cancels every watch
	// when the stream's next request of the type arrives (the
	// acknowledgement of that answer), and the cancel of an answered
	// watch has nothing to do, so it does not take c.mu, which a push
	// holds for each node in turn.
	answered atomic.Bool
}

// ErrUnknownDeltaStream: a delta watch for a request the stream callbacks
// did not see, so its stream's state cannot be found.
var ErrUnknownDeltaStream = errors.New("xds: delta request of an unknown stream")

// deltaRequest notes the stream a request arrived on, for the
// CreateDeltaWatch that go-control-plane calls next with it. It takes
// c.streamsMu, not c.mu: an acknowledgement takes c.mu once, in
// CreateDeltaWatch.
func (c *cache) deltaRequest(stream int64, req *discoveryv3.DeltaDiscoveryRequest) {
	c.streamsMu.Lock()
	defer c.streamsMu.Unlock()
	ds := c.deltas[stream]
	if ds == nil {
		ds = &deltaStream{known: map[string]*deltaKnown{}}
		c.deltas[stream] = ds
	}
	if ds.pending != nil {
		delete(c.deltaReqs, ds.pending)
	}
	ds.pending = req
	c.deltaReqs[req] = stream
}

// deltaClosed forgets a delta stream.
func (c *cache) deltaClosed(stream int64) {
	c.streamsMu.Lock()
	defer c.streamsMu.Unlock()
	if ds := c.deltas[stream]; ds != nil && ds.pending != nil {
		delete(c.deltaReqs, ds.pending)
	}
	delete(c.deltas, stream)
}

// deltaStreamOf returns the state of the stream req arrived on. c.mu is
// held (the stream's known is c.mu's), c.streamsMu is taken.
func (c *cache) deltaStreamOf(req *cachev3.DeltaRequest) (*deltaStream, error) {
	c.streamsMu.Lock()
	defer c.streamsMu.Unlock()
	id, ok := c.deltaReqs[req]
	if !ok {
		return nil, ErrUnknownDeltaStream
	}
	delete(c.deltaReqs, req)
	ds := c.deltas[id]
	if ds == nil {
		return nil, ErrUnknownDeltaStream
	}
	ds.pending = nil
	return ds, nil
}

// deltaUpdate applies a request to what its client holds of its type: on
// a stream's first request of a type, the versions it says it holds
// (initial_resource_versions); later, the names it unsubscribes, which
// it no longer holds, or, where go-control-plane marked one with "", must
// be sent again or removed. c.mu is held.
func deltaUpdate(ds *deltaStream, req *cachev3.DeltaRequest, sub cachev3.Subscription) *deltaKnown {
	typ := req.GetTypeUrl()
	k := ds.known[typ]
	if k == nil {
		k = &deltaKnown{}
		if rr := sub.ReturnedResources(); len(rr) > 0 {
			k.over = make(map[string]string, len(rr))
			for name, v := range rr {
				k.over[name] = v
			}
		}
		ds.known[typ] = k
		return k
	}
	returned := sub.ReturnedResources()
	for _, name := range req.GetResourceNamesUnsubscribe() {
		if name == "*" {
			// No longer wildcard: it holds of k.at only what it names
			// (go-control-plane forgets the rest).
			if !sub.IsWildcard() && k.at != nil {
				subscribed := sub.SubscribedResources()
				for _, name := range k.at.names {
					if _, ok := subscribed[name]; !ok {
						if _, ok := k.over[name]; !ok {
							if k.over == nil {
								k.over = map[string]string{}
							}
							k.over[name] = deltaAbsent
						}
					}
				}
			}
			continue
		}
		v := deltaAbsent
		if mark, ok := returned[name]; ok && mark == "" {
			v = ""
		} else if _, held := k.held(name); !held {
			// A name it does not hold (one it made up): nothing changes,
			// and nothing is kept.
			continue
		}
		if k.over == nil {
			k.over = map[string]string{}
		}
		k.over[name] = v
	}
	return k
}

// deltaResource is the resource of name as every delta response of its
// typeSet shares it. c.mu is held.
func (ts *typeSet) deltaResource(name string) *discoveryv3.Resource {
	if ts.delta == nil {
		ts.delta = make(map[string]*discoveryv3.Resource, len(ts.names))
	}
	r := ts.delta[name]
	if r == nil {
		r = &discoveryv3.Resource{Name: name, Version: ts.versions[name], Resource: ts.anys[name]}
		ts.delta[name] = r
	}
	return r
}

// diffFrom is what a client holding all of from (nil: nothing) is sent to
// hold all of ts, computed once per pair. c.mu is held.
func (ts *typeSet) diffFrom(c *cache, from *typeSet) *deltaDiff {
	if from == ts {
		return &deltaDiff{}
	}
	var fromID uint64
	if from != nil {
		fromID = c.typeSetID(from)
	}
	if d, ok := ts.diffs[fromID]; ok {
		return d
	}
	d := &deltaDiff{}
	for _, name := range ts.names {
		v := ts.versions[name]
		var old string
		var ok bool
		if from != nil {
			old, ok = from.versions[name]
		}
		if !ok {
			d.added = append(d.added, name)
		}
		if !ok || old != v {
			d.upserts = append(d.upserts, ts.deltaResource(name))
		}
	}
	if from != nil {
		for _, name := range from.names {
			if _, ok := ts.versions[name]; !ok {
				d.removed = append(d.removed, name)
			}
		}
	}
	if ts.diffs == nil {
		ts.diffs = map[uint64]*deltaDiff{}
	}
	// Only the latest few sources are kept: streams lag by a push or two.
	if len(ts.diffs) >= 8 {
		clear(ts.diffs)
	}
	ts.diffs[fromID] = d
	return d
}

// typeSetID numbers a typeSet the first time a delta diff names it, so
// that a memoized diff does not keep its source alive. c.mu is held.
func (c *cache) typeSetID(ts *typeSet) uint64 {
	if ts.id == 0 {
		c.nextTypeSet++
		ts.id = c.nextTypeSet
	}
	return ts.id
}

// deltaAnswer computes what a delta watch is sent to hold the node's
// configuration of its type, and what its client then holds. It returns
// nil when there is nothing to send. c.mu is held.
func (c *cache) deltaAnswer(k *deltaKnown, req *cachev3.DeltaRequest, sub cachev3.Subscription, first bool, pub *published) (*cachev3.DeltaPassthroughResponse, *deltaKnown) {
	typ := req.GetTypeUrl()
	to := pub.types[typ]
	if to == nil {
		// A type the configuration does not have: a fresh empty set,
		// which nothing shares.
		to = &typeSet{versions: map[string]string{}}
	} else if to.versions == nil {
		to.versions = pub.snap.GetVersionMap(typ)
	}
	var (
		upserts []*discoveryv3.Resource
		removed []string
		next    *deltaKnown
		// encoded are upserts encoded, when they are a shared diff's.
		encoded []byte
	)
	wildcard := sub.IsWildcard()
	subscribed := sub.SubscribedResources()
	if len(k.over) == 0 {
		// The client holds all of k.at: the shared diff. A named
		// subscription then names every resource of k.at (deltaUpdate
		// and deltaSlow see to it), so filtering the diff by what it
		// names is the whole answer.
		d := to.diffFrom(c, k.at)
		next = &deltaKnown{at: to}
		if wildcard {
			upserts, removed = d.upserts, d.removed
		} else {
			upserts = filterResources(d.upserts, subscribed)
			if len(upserts) == len(d.upserts) {
				// Nothing filtered out: the shared slice itself.
				upserts = d.upserts
			}
			removed = filterNames(d.removed, subscribed)
			// Names new in to that it does not subscribe to are not sent.
			for _, name := range d.added {
				if _, ok := subscribed[name]; !ok {
					if next.over == nil {
						next.over = map[string]string{}
					}
					next.over[name] = deltaAbsent
				}
			}
		}
		if len(upserts) > 0 && len(upserts) == len(d.upserts) {
			encoded = d.encodedUpserts()
		}
	} else {
		upserts, removed, next = c.deltaSlow(k, to, wildcard, subscribed)
	}
	if len(upserts) == 0 && len(removed) == 0 && !(wildcard && first) {
		return nil, nil
	}
	resp := &discoveryv3.DeltaDiscoveryResponse{
		Resources:         upserts,
		RemovedResources:  removed,
		TypeUrl:           typ,
		SystemVersionInfo: to.version,
	}
	if encoded != nil {
		// The shared encoding instead of the stream's own (encoded.go).
		resp.Resources = nil
		resp.ProtoReflect().SetUnknown(encoded)
	}
	return &cachev3.DeltaPassthroughResponse{
		DeltaRequest:           req,
		NextVersionMap:         map[string]string{},
		DeltaDiscoveryResponse: resp,
	}, next
}

// deltaSlow diffs what a client holds resource by resource, for a
// client whose holdings are not all of one typeSet (it unsubscribed, or
// reconnected with versions of its own). c.mu is held.
func (c *cache) deltaSlow(k *deltaKnown, to *typeSet, wildcard bool, subscribed map[string]struct{}) ([]*discoveryv3.Resource, []string, *deltaKnown) {
	var (
		upserts []*discoveryv3.Resource
		removed []string
	)
	if wildcard {
		for _, name := range to.names {
			if v, ok := k.held(name); !ok || v != to.versions[name] {
				upserts = append(upserts, to.deltaResource(name))
			}
		}
		gone := func(name string) {
			if _, ok := to.versions[name]; !ok {
				if _, held := k.held(name); held {
					removed = append(removed, name)
				}
			}
		}
		seen := map[string]bool{}
		if k.at != nil {
			for _, name := range k.at.names {
				seen[name] = true
				gone(name)
			}
		}
		for name := range k.over {
			if !seen[name] {
				gone(name)
			}
		}
		return upserts, sortedCopy(removed), &deltaKnown{at: to}
	}
	in := 0
	for name := range subscribed {
		if v, ok := to.versions[name]; ok {
			in++
			if held, ok := k.held(name); !ok || held != v {
				upserts = append(upserts, to.deltaResource(name))
			}
		} else if _, held := k.held(name); held {
			removed = append(removed, name)
		}
	}
	sortResources(upserts)
	next := &deltaKnown{}
	if in*2 < len(to.names) {
		// It holds few of to's resources: name them.
		next.over = make(map[string]string, in)
		for name := range subscribed {
			if v, ok := to.versions[name]; ok {
				next.over[name] = v
			}
		}
	} else {
		next.at = to
		for _, name := range to.names {
			if _, ok := subscribed[name]; !ok {
				if next.over == nil {
					next.over = map[string]string{}
				}
				next.over[name] = deltaAbsent
			}
		}
	}
	return upserts, sortedCopy(removed), next
}

// deltaRespond answers a delta watch if the node's configuration holds
// something its client lacks, and reports whether it did. c.mu is held.
func (c *cache) deltaRespond(w *deltaWatch, pub *published) bool {
	typ := w.typ
	k := w.stream.known[typ]
	if !w.first && len(k.over) == 0 && k.at != nil && k.at == pub.types[typ] {
		// The client holds all of the type's set: a push that changed
		// other types (an endpoint: every stream's clusters, listeners
		// and routes stay) has nothing to send here, which deltaAnswer
		// would find out with a diff of the set with itself.
		return false
	}
	resp, next := c.deltaAnswer(k, w.req, w.sub, w.first, pub)
	if resp == nil {
		return false
	}
	w.stream.known[typ] = next
	w.answered.Store(true)
	// The channel holds two responses per type and each watch gets one.
	w.out <- resp
	return true
}

func sortedCopy(names []string) []string {
	slices.Sort(names)
	return names
}

func sortResources(rs []*discoveryv3.Resource) {
	slices.SortFunc(rs, func(a, b *discoveryv3.Resource) int { return strings.Compare(a.GetName(), b.GetName()) })
}

func filterResources(rs []*discoveryv3.Resource, subscribed map[string]struct{}) []*discoveryv3.Resource {
	for i, r := range rs {
		if _, ok := subscribed[r.GetName()]; !ok {
			out := append(make([]*discoveryv3.Resource, 0, len(rs)-1), rs[:i]...)
			for _, r := range rs[i+1:] {
				if _, ok := subscribed[r.GetName()]; ok {
					out = append(out, r)
				}
			}
			return out
		}
	}
	return rs
}

func filterNames(names []string, subscribed map[string]struct{}) []string {
	for i, name := range names {
		if _, ok := subscribed[name]; !ok {
			out := append(make([]string, 0, len(names)-1), names[:i]...)
			for _, name := range names[i+1:] {
				if _, ok := subscribed[name]; ok {
					out = append(out, name)
				}
			}
			return out
		}
	}
	return names
}
