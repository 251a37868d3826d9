package xds

import (
	"cmp"
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"time"
)

// ClientsPath is where the monitoring server serves Clients, as
// `istioctl proxy-status` reads istiod's debug endpoint.
const ClientsPath = "/debug/xds/clients"

// Clients is what the xDS server knows of its connected nodes at Time, the
// server's clock.
type Clients struct {
	Time    time.Time      `json:"time"`
	Clients []ClientStatus `json:"clients"`
}

// ClientStatus is one connected node.
type ClientStatus struct {
	NodeID   string `json:"node_id"`
	SPIFFEID string `json:"spiffe_id"`
	// Streams is how many ADS streams the node has open; Delta is set when
	// one of them is a delta stream, whose versions are not tracked.
	Streams int  `json:"streams"`
	Delta   bool `json:"delta,omitempty"`
	// ConnectedSince is when the node's oldest open stream opened.
	ConnectedSince time.Time `json:"connected_since"`
	// Types are the resource types sent to the node over state of the
	// world, by type URL.
	Types []TypeStatus `json:"types"`
	// Synced is set when the node has acknowledged, over state of the
	// world, the current version of every type it was sent (istioctl's
	// SYNCED).
	Synced bool `json:"synced"`
	// PendingSince is when the oldest version the node has not yet
	// acknowledged was sent; zero when it has acknowledged all it was sent.
	PendingSince time.Time `json:"pending_since,omitzero"`
}

// TypeStatus is one resource type of a node: the version last sent, the
// version last acknowledged, and the version the server holds for it now.
type TypeStatus struct {
	TypeURL string `json:"type_url"`
	Sent    string `json:"sent"`
	Acked   string `json:"acked,omitempty"`
	Current string `json:"current,omitempty"`
}

// streamView is a stream's state copied under its lock.
type streamView struct {
	delta         bool
	opened, since time.Time
	sent, acked   map[string]string
}

// Clients returns the connected nodes, sorted by node id.
func (s *Server) Clients() Clients {
	return Clients{Time: s.cfg.Clock.Now(), Clients: s.clients("")}
}

// clients returns the status of the connected nodes, or only of node only
// when it is not empty.
func (s *Server) clients(only string) []ClientStatus {
	s.mu.Lock()
	gen := s.gen
	nodes := make(map[string]*nodeState, len(s.nodes))
	for id, ns := range s.nodes {
		if only == "" || id == only {
			nodes[id] = ns
		}
	}
	s.mu.Unlock()

	byNode := map[string][]streamView{}
	s.streams.Range(func(k, v any) bool {
		st := v.(*stream)
		st.mu.Lock()
		defer st.mu.Unlock()
		if st.node == nil || nodes[st.node.ID] == nil {
			return true
		}
		byNode[st.node.ID] = append(byNode[st.node.ID], streamView{
			delta: k.(streamKey).delta, opened: st.opened, since: st.pendingSince,
			sent: maps.Clone(st.sent), acked: maps.Clone(st.acked),
		})
		return true
	})

	out := make([]ClientStatus, 0, len(nodes))
	for id, ns := range nodes {
		views := byNode[id]
		if len(views) == 0 {
			continue
		}
		var pub *published
		if gen != nil {
			pub, _, _ = gen.publish(ns.node)
		}
		out = append(out, nodeStatus(id, ns, pub, views))
	}
	slices.SortFunc(out, func(a, b ClientStatus) int { return cmp.Compare(a.NodeID, b.NodeID) })
	return out
}

// nodeStatus builds one node's status from its streams. A node is synced when
// it has a state-of-the-world stream that was sent something, and every
// such stream acknowledged the current version of every type it was sent.
func nodeStatus(id string, ns *nodeState, pub *published, views []streamView) ClientStatus {
	c := ClientStatus{NodeID: id, SPIFFEID: ns.id.String(), Streams: len(views)}
	types := map[string]TypeStatus{}
	synced, sotwSent := pub != nil, false
	for _, v := range views {
		if c.ConnectedSince.IsZero() || v.opened.Before(c.ConnectedSince) {
			c.ConnectedSince = v.opened
		}
		if v.delta {
			c.Delta = true
			continue
		}
		if !v.since.IsZero() && (c.PendingSince.IsZero() || v.since.Before(c.PendingSince)) {
			c.PendingSince = v.since
		}
		for typ, sent := range v.sent {
			sotwSent = true
			ts := TypeStatus{TypeURL: typ, Sent: sent, Acked: v.acked[typ]}
			if pub != nil && pub.types[typ] != nil {
				ts.Current = pub.types[typ].version
			}
			if ts.Current == "" || ts.Acked != ts.Current {
				synced = false
			}
			types[typ] = ts
		}
	}
	c.Synced = synced && sotwSent
	c.Types = slices.SortedFunc(maps.Values(types), func(a, b TypeStatus) int { return cmp.Compare(a.TypeURL, b.TypeURL) })
	return c
}

// ClientsHandler serves Clients as JSON, for the monitoring server's
// ClientsPath.
func (s *Server) ClientsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(s.Clients())
	})
}
