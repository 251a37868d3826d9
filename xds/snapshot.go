package xds

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strconv"
	"sync"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// ErrInconsistent marks a snapshot whose resources reference routes or
// endpoints it does not hold, or hold two resources of one name.
var ErrInconsistent = errors.New("xds: inconsistent snapshot")

// generation is one mesh and policy set. It memoizes what nodes share:
// resources are built once per workload, and each resource is hashed,
// validated and checked once.
type generation struct {
	builder *proxyconfig.Builder
	log     *slog.Logger

	mu    sync.Mutex
	info  map[proto.Message]*resInfo
	snaps map[string]*built // by shareKey
	// keys are the nodes' shareKeys, by configKey.
	keys map[string]string
	// checked are the resources of this generation that passed every
	// check, by their content; carried are the previous generation's
	// (read only). See infoOf.
	checked, carried map[contentKey]*resInfo
	// owns are the sidecars' own inputs and the shareKeys derived from
	// them, by configKey; carriedOwns are the previous generation's (read
	// only). See shareKey.
	owns, carriedOwns map[string]ownMemo
	// carriedSets are the type sets the previous generation published,
	// by type and version (read only). See check.
	carriedSets map[typeSetKey]*typeSet
	// byID counts the mesh's pods per SPIFFE ID, once per generation.
	byID map[spiffeid.ID]int
	// policyVersion is the version of the policy snapshot the builder
	// holds: node proxies' Authorization revision.
	policyVersion uint64
	// ambient are the Workload resources every node proxy is sent, built
	// on first use (ambient.go).
	ambient *ambientSet
}

// pods is how many pods of the mesh run as id.
func (g *generation) pods(id spiffeid.ID) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.byID == nil {
		g.byID = map[spiffeid.ID]int{}
		for _, w := range g.builder.Mesh().AllWorkloads() {
			g.byID[w.ID]++
		}
	}
	return g.byID[id]
}

type built struct {
	pub *published
	res *proxyconfig.Resources
	err error
}

type resInfo struct {
	name string
	hash string
	any  *anypb.Any
	refs map[resource.Type]map[string]bool
	err  error
}

func newGeneration(b *proxyconfig.Builder, log *slog.Logger) *generation {
	return &generation{builder: b, log: log, info: map[proto.Message]*resInfo{}, checked: map[contentKey]*resInfo{},
		owns: map[string]ownMemo{}, snaps: map[string]*built{}, keys: map[string]string{}}
}

// ownMemo is a sidecar's own inputs (proxyconfig.SidecarOwnInputs) and
// the shareKey they gave.
type ownMemo struct {
	inputs, key string
}

// carryFrom lets g reuse the resources prev checked (infoOf) and the
// sidecars' keys prev derived (shareKey). prev's builder must have g's
// Config (the Server's). It copies prev's sets, under prev's lock, so
// that g holds no reference to prev and prev may still be read
// (Resources) while g is built.
func (g *generation) carryFrom(prev *generation) {
	if prev == nil {
		return
	}
	prev.mu.Lock()
	carried, owns, keys := maps.Clone(prev.checked), maps.Clone(prev.owns), len(prev.keys)
	sets := map[typeSetKey]*typeSet{}
	for _, b := range prev.snaps {
		if b.pub != nil {
			for typ, ts := range b.pub.types {
				sets[typeSetKey{typ, ts.version}] = ts
			}
		}
	}
	prev.mu.Unlock()
	g.mu.Lock()
	g.carried, g.carriedOwns, g.carriedSets = carried, owns, sets
	if len(g.keys) == 0 && len(g.owns) == 0 {
		// Sized for the nodes prev had: each asks for its key on the push.
		g.keys, g.owns = make(map[string]string, keys), make(map[string]ownMemo, len(owns))
	}
	g.mu.Unlock()
}

// configKey identifies what a node's resources depend on: its kind and
// its pod, whose labels and service account the mesh gives.
func configKey(n *proxyconfig.Node) string {
	// Concatenated, not formatted: every node's is made on every push.
	return string(n.Type) + "|" + strconv.FormatBool(n.Proxyless) + "|" + n.Namespace + "|" + n.ServiceAccount + "|pod:" + n.Pod
}

// shareKey is the key under which a node's snapshot is kept and shared.
// A sidecar's resources are the generation's shared outbound side plus
// its own inbound side (proxyconfig.SidecarOwn), so sidecars of one
// namespace and service account whose own resources marshal to the same
// bytes get equal resources: they share one snapshot, keyed by those
// bytes. Every other node (gateways, proxyless clients, and a pod Build
// refuses) keeps its own, keyed by its pod. The key is computed once per
// node and generation; a sidecar whose own inputs
// (proxyconfig.SidecarOwnInputs) are those it had in the previous
// generation keeps its key without building and encoding its own
// resources again: equal inputs, under one Config, build equal resources.
func (g *generation) shareKey(n *proxyconfig.Node) (string, error) {
	pod := configKey(n)
	g.mu.Lock()
	key, ok := g.keys[pod]
	g.mu.Unlock()
	if ok {
		return key, nil
	}
	inputs, ok, err := g.builder.SidecarOwnInputs(n)
	if err != nil {
		return "", err
	}
	key = pod
	if ok {
		g.mu.Lock()
		m, found := g.carriedOwns[pod]
		g.mu.Unlock()
		if found && m.inputs == inputs {
			key = m.key
		} else {
			own, _, err := g.builder.SidecarOwn(n)
			if err != nil {
				return "", err
			}
			if key, err = ownKey(n, own); err != nil {
				return "", err
			}
		}
	}
	g.mu.Lock()
	g.keys[pod] = key
	if ok {
		g.owns[pod] = ownMemo{inputs: inputs, key: key}
	}
	g.mu.Unlock()
	return key, nil
}

// ownKey names a sidecar's configuration by its namespace, service account
// and the deterministic encoding of its own resources, type by type.
func ownKey(n *proxyconfig.Node, own *proxyconfig.Resources) (string, error) {
	h := sha256.New()
	field := func(b []byte) {
		var l [8]byte
		binary.BigEndian.PutUint64(l[:], uint64(len(b)))
		h.Write(l[:])
		h.Write(b)
	}
	field([]byte(n.Namespace))
	field([]byte(n.ServiceAccount))
	byType := own.ByType()
	typs := slices.Sorted(maps.Keys(byType))
	for _, typ := range typs {
		field([]byte(typ))
		field(binary.BigEndian.AppendUint64(nil, uint64(len(byType[typ]))))
		for _, r := range byType[typ] {
			raw, err := (proto.MarshalOptions{Deterministic: true}).Marshal(r)
			if err != nil {
				return "", fmt.Errorf("xds: encoding %s: %w", typ, err)
			}
			field(raw)
		}
	}
	return "sidecar-content|" + hex.EncodeToString(h.Sum(nil)), nil
}

// snapshot returns the node's checked configuration and its resources.
// Nodes that share a configuration share what is returned, built once.
func (g *generation) snapshot(n *proxyconfig.Node) (*published, *proxyconfig.Resources, error) {
	if _, err := g.builder.Workload(n); err != nil {
		return nil, nil, err
	}
	key, err := g.shareKey(n)
	if err != nil {
		return nil, nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if b, ok := g.snaps[key]; ok {
		return b.pub, b.res, b.err
	}
	b := &built{}
	b.res, b.err = g.builder.Build(n)
	if b.err == nil {
		// Once per configuration and generation, not per node.
		for _, r := range b.res.Refusals {
			g.log.Warn("policy refused for a proxyless workload", "refusal", r)
		}
		for _, w := range b.res.Warnings {
			g.log.Debug("xds: left out", "node", n.ID, "what", w)
		}
		if b.err = proxyconfig.CheckSecrets(g.builder.Mesh(), n, b.res); b.err == nil {
			b.pub, b.err = g.check(b.res)
		}
	}
	g.snaps[key] = b
	return b.pub, b.res, b.err
}

// nodeResources returns the node's own resources, as Build gives them,
// once its configuration has passed the checks: what a shared snapshot
// holds, with the warnings of this node rather than of the node it was
// first built for (`trustmesh xds dump`).
func (g *generation) nodeResources(n *proxyconfig.Node) (*proxyconfig.Resources, error) {
	if _, _, err := g.snapshot(n); err != nil {
		return nil, err
	}
	return g.builder.Build(n)
}

// contentKey indexes checked resources by type and the FNV-1a hash of
// their deterministic encoding (their version). It only finds a
// candidate: reuse also needs the bytes to be equal.
type contentKey struct {
	typeURL string
	sum     uint64
}

// infoOf validates, checks and marshals a resource once per generation.
// A resource whose type and deterministic encoding are byte for byte
// those of one that passed in this generation or the previous one is
// not checked again: its resInfo is reused. That is sound because every
// check here (Validate, CheckStrictResource) and everything else kept in
// a resInfo (name, references, version, Any) is a function of the
// message's value alone, not of the node or the configuration it is
// built for, and the deterministic encoding determines the value: the
// bytes decode to a message equal to both. The checks that do depend on
// the node and its configuration (CheckSecrets, consistency in check)
// run per configuration as before. A resource that failed is never
// carried, so it is checked again. g.mu is held.
func (g *generation) infoOf(r types.Resource) *resInfo {
	if ri, ok := g.info[r]; ok {
		return ri
	}
	typeURL := "type.googleapis.com/" + string(r.ProtoReflect().Descriptor().FullName())
	raw, merr := (proto.MarshalOptions{Deterministic: true}).Marshal(r)
	var key contentKey
	if merr == nil {
		key = contentKey{typeURL: typeURL, sum: fnvSum(raw)}
		for _, set := range []map[contentKey]*resInfo{g.checked, g.carried} {
			if ri, ok := set[key]; ok && bytes.Equal(ri.any.GetValue(), raw) {
				g.checked[key] = ri
				g.info[r] = ri
				return ri
			}
		}
	}
	ri := &resInfo{name: cachev3.GetResourceName(r)}
	if ri.err = proxyconfig.Validate(r); ri.err == nil {
		ri.err = proxyconfig.CheckStrictResource(r)
	}
	if ri.err == nil {
		ri.err = merr
	}
	ri.refs = cachev3.GetResourceReferences(map[string]types.ResourceWithTTL{ri.name: {Resource: r}})
	if ri.err == nil {
		ri.hash, ri.any = fmt.Sprintf("%x", key.sum), &anypb.Any{TypeUrl: typeURL, Value: raw}
		g.checked[key] = ri
	}
	g.info[r] = ri
	return ri
}

func fnvSum(raw []byte) uint64 {
	h := fnv.New64a()
	h.Write(raw)
	return h.Sum64()
}

// marshalResource marshals a resource once, deterministically, and hashes
// it: the hash is its version (delta), the Any what every response of its
// generation shares.
func marshalResource(r proto.Message) (string, *anypb.Any, error) {
	raw, err := (proto.MarshalOptions{Deterministic: true}).Marshal(r)
	if err != nil {
		return "", nil, err
	}
	return fmt.Sprintf("%x", fnvSum(raw)), &anypb.Any{TypeUrl: "type.googleapis.com/" + string(r.ProtoReflect().Descriptor().FullName()), Value: raw}, nil
}

// typeSetKey finds a carried typeSet: its type and version.
type typeSetKey struct{ typ, version string }

// sameSet is whether a and b hold the same resources, byte for byte:
// a version is a hash, and reusing a set on a collision would leave its
// clients without the change.
func sameSet(a, b *typeSet) bool {
	if a.version != b.version || len(a.names) != len(b.names) {
		return false
	}
	for i, name := range a.names {
		if b.names[i] != name {
			return false
		}
		x, y := a.anys[name], b.anys[name]
		if x != y && (x.GetTypeUrl() != y.GetTypeUrl() || !bytes.Equal(x.GetValue(), y.GetValue())) {
			return false
		}
	}
	return true
}

// typeVersion is a type's version (state of the world): a hash of its
// resources' sorted names and versions.
func typeVersion(sorted []string, versions map[string]string) string {
	h := fnv.New64a()
	for _, n := range sorted {
		h.Write([]byte(n))
		h.Write([]byte{0})
		h.Write([]byte(versions[n]))
		h.Write([]byte{0})
	}
	return fmt.Sprintf("%x", h.Sum64())
}

// check validates every resource, refuses anything but strict mTLS,
// checks consistency and assembles the snapshot with per-type and
// per-resource versions.
func (g *generation) check(res *proxyconfig.Resources) (*published, error) {
	snap := &cachev3.Snapshot{VersionMap: map[string]map[string]string{}}
	pub := &published{snap: snap, types: map[string]*typeSet{}}
	var errs []error
	refs := map[resource.Type]map[string]bool{}
	for typ, items := range res.ByType() {
		idx := cachev3.GetResponseType(typ)
		versions := make(map[string]string, len(items))
		withTTL := make([]types.ResourceWithTTL, 0, len(items))
		names := make([]string, 0, len(items))
		anys := make(map[string]*anypb.Any, len(items))
		for _, r := range items {
			ri := g.infoOf(r)
			if ri.err != nil {
				errs = append(errs, ri.err)
				continue
			}
			if _, dup := versions[ri.name]; dup {
				errs = append(errs, fmt.Errorf("%w: two %s resources named %q", ErrInconsistent, typ, ri.name))
				continue
			}
			versions[ri.name] = ri.hash
			anys[ri.name] = ri.any
			names = append(names, ri.name)
			withTTL = append(withTTL, types.ResourceWithTTL{Resource: r})
			for t, set := range ri.refs {
				if refs[t] == nil {
					refs[t] = map[string]bool{}
				}
				for name := range set {
					refs[t][name] = true
				}
			}
		}
		sort.Strings(names)
		version := typeVersion(names, versions)
		snap.Resources[idx] = cachev3.NewResourcesWithTTL(version, withTTL)
		snap.VersionMap[typ] = versions
		ts := &typeSet{version: version, names: names, anys: anys, versions: versions}
		if prev := g.carriedSets[typeSetKey{typ, version}]; prev != nil && sameSet(prev, ts) {
			// What the previous generation published of the type, and
			// what every client that holds it holds: kept, so that a
			// push that changed other types finds nothing to diff or send
			// here (deltaRespond), and the set's encodings and diffs
			// are not made again.
			ts = prev
		}
		pub.types[typ] = ts
	}
	// As Snapshot.Consistent: the routes and endpoints are exactly those
	// the listeners and clusters name.
	for _, typ := range []resource.Type{resource.EndpointType, resource.RouteType} {
		have := snap.VersionMap[typ]
		want := refs[typ]
		for name := range want {
			if _, ok := have[name]; !ok {
				errs = append(errs, fmt.Errorf("%w: %s %q is referenced but missing", ErrInconsistent, typ, name))
			}
		}
		for name := range have {
			if !want[name] {
				errs = append(errs, fmt.Errorf("%w: %s %q is not referenced", ErrInconsistent, typ, name))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return pub, nil
}
