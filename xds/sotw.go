package xds

import (
	"context"
	"sort"
	"sync"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// published is what a node is given: the go-control-plane snapshot (for
// delta streams) and, per type, the version and the resources already
// marshaled, shared by every node and response of a generation.
type published struct {
	snap  *cachev3.Snapshot
	types map[string]*typeSet
}

type typeSet struct {
	version string
	names   []string // sorted
	anys    map[string]*anypb.Any
}

// cache serves state-of-the-world watches itself, answering from
// resources marshaled once per generation, so that ten thousand streams
// do not each hold a private marshaled copy of the same configuration.
// Delta watches go to go-control-plane's snapshot cache.
type cache struct {
	cachev3.SnapshotCache // delta and fetch

	mu    sync.Mutex
	nodes map[string]*sotwNode
	next  int64
}

var _ cachev3.Cache = (*cache)(nil)

type sotwNode struct {
	pub     *published
	watches map[int64]*sotwWatch
}

type sotwWatch struct {
	req *cachev3.Request
	sub cachev3.Subscription
	out chan cachev3.Response
}

func newCache() *cache {
	return &cache{SnapshotCache: cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil), nodes: map[string]*sotwNode{}}
}

func (c *cache) node(id string) *sotwNode {
	n := c.nodes[id]
	if n == nil {
		n = &sotwNode{watches: map[int64]*sotwWatch{}}
		c.nodes[id] = n
	}
	return n
}

// set publishes a node's configuration to delta and state-of-the-world
// watches.
func (c *cache) set(id string, pub *published) error {
	if err := c.SetSnapshot(context.Background(), id, pub.snap); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	n.pub = pub
	for wid, w := range n.watches {
		ts := pub.types[w.req.GetTypeUrl()]
		if ts == nil || ts.version == w.req.GetVersionInfo() {
			continue
		}
		respond(w, ts)
		delete(n.watches, wid)
	}
	return nil
}

// clear forgets a node.
func (c *cache) clear(id string) {
	c.ClearSnapshot(id)
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.nodes[id]; n != nil && len(n.watches) == 0 {
		delete(c.nodes, id)
	} else if n != nil {
		n.pub = nil
	}
}

// CreateWatch answers at once when the node's configuration is newer than
// the request's, or holds a resource the client subscribes to and has not
// been sent; otherwise it waits for the next set.
func (c *cache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	id := req.GetNode().GetId()
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	if n.pub != nil {
		if ts := n.pub.types[req.GetTypeUrl()]; ts != nil && (ts.version != req.GetVersionInfo() || unsent(ts, sub)) {
			respond(&sotwWatch{req: req, sub: sub, out: out}, ts)
			return func() {}, nil
		}
	}
	c.next++
	wid := c.next
	n.watches[wid] = &sotwWatch{req: req, sub: sub, out: out}
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if n := c.nodes[id]; n != nil {
			delete(n.watches, wid)
			if len(n.watches) == 0 && n.pub == nil {
				delete(c.nodes, id)
			}
		}
	}, nil
}

// unsent reports whether a subscribed resource exists that the client has
// not been sent.
func unsent(ts *typeSet, sub cachev3.Subscription) bool {
	returned := sub.ReturnedResources()
	if sub.IsWildcard() {
		for _, name := range ts.names {
			if _, ok := returned[name]; !ok {
				return true
			}
		}
		return false
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
// the marshaled resources; only its list is the stream's own (the server
// sets the nonce on it).
func respond(w *sotwWatch, ts *typeSet) {
	var names []string
	if w.sub.IsWildcard() {
		names = ts.names
	} else {
		for name := range w.sub.SubscribedResources() {
			if _, ok := ts.anys[name]; ok {
				names = append(names, name)
			}
		}
		sort.Strings(names)
	}
	resources := make([]*anypb.Any, len(names))
	returned := make(map[string]string, len(names))
	for i, name := range names {
		resources[i] = ts.anys[name]
		returned[name] = ts.version
	}
	// The channel holds one response and each watch gets one.
	w.out <- &cachev3.PassthroughResponse{
		Request:           w.req,
		DiscoveryResponse: &discoveryv3.DiscoveryResponse{VersionInfo: ts.version, Resources: resources, TypeUrl: w.req.GetTypeUrl()},
		ReturnedResources: returned,
	}
}
