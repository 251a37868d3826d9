package mesh

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	securityv1beta1 "istio.io/api/security/v1beta1"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/internal/watch"
)

// APIVersion is the apiVersion of trustmesh's own mesh file kinds.
const APIVersion = "mesh.trustmesh.io/v1alpha1"

// DefaultDomain is the cluster DNS domain of service hostnames.
const DefaultDomain = "cluster.local"

// Source provides the mesh model.
type Source interface {
	// Mesh returns the current mesh, or an error naming the file or object
	// at fault.
	Mesh() (*Mesh, error)
	// Watch returns once the watch is in place, then calls changed whenever
	// the mesh may have changed, until ctx ends. The channel receives the
	// watch's final error: nil when ctx ended.
	Watch(ctx context.Context, changed func()) (<-chan error, error)
}

// Static is a Source that never changes, for tests and embedding.
type Static struct{ M *Mesh }

var _ Source = Static{}

// Mesh returns the mesh.
func (s Static) Mesh() (*Mesh, error) { return s.M, nil }

// Watch never reports a change.
func (s Static) Watch(ctx context.Context, _ func()) (<-chan error, error) {
	c := make(chan error, 1)
	go func() { <-ctx.Done(); c <- nil }()
	return c, nil
}

// Dir is a directory of mesh YAML files (local mode). It reads, in name
// order, every *.yaml and *.yml file directly in the directory. Each
// document is one of
//
//   - mesh.trustmesh.io/v1alpha1 Service: a service, its ports and its
//     endpoints, each with an address, a pod name, a SPIFFE ID and labels;
//   - mesh.trustmesh.io/v1alpha1 Workload: a workload, named by its pod,
//     with a SPIFFE ID and labels, and for ambient mode its node, its
//     addresses, its dataplaneMode (ambient, sidecar, the default, or
//     none) and the netns the node proxy captures it in. A client or a
//     gateway that serves no service is listed only so; a Workload of the
//     same pod as a service endpoint says how that endpoint is reached.
//     The xDS server configures only the workloads the files list, as
//     endpoints or as Workloads;
//   - mesh.trustmesh.io/v1alpha1 ExternalService, or networking.istio.io
//     ServiceEntry with location MESH_EXTERNAL: a host reached through the
//     egress gateway;
//   - mesh.trustmesh.io/v1alpha1 Gateway: an ingress or egress gateway;
//   - mesh.trustmesh.io/v1alpha1 TLSSecret: a gateway's certificate and key,
//     from files relative to the directory;
//   - security.istio.io PeerAuthentication: anything but STRICT is refused
//     (and reported), never honoured;
//   - mesh.trustmesh.io/v1alpha1 Node (no namespace): the identities the
//     node agent of the node metadata.name may hold, each with the
//     selectors (uid, gid, path, sha256, netns) a local process must all
//     match to receive it.
//
// Unknown kinds and fields are errors.
//
// A Dir remembers what each document parsed to, keyed by the document's
// bytes, so that a read after a change parses only the documents that
// changed; every file is still read in full on every read, and a
// TLSSecret's certificate and key files are read again each time.
type Dir struct {
	Path string
	// Domain is the DNS domain of service hostnames; empty means
	// DefaultDomain.
	Domain string

	mu    sync.Mutex
	cache *docCache
}

var _ Source = (*Dir)(nil)

// ErrFile marks a mesh file that does not parse.
var ErrFile = errors.New("mesh: bad mesh file")

type fileDoc struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec json.RawMessage `json:"spec"`
}

type filePort struct {
	Name       string `json:"name"`
	Port       uint32 `json:"port"`
	Protocol   string `json:"protocol"`
	TargetPort uint32 `json:"targetPort"`
}

type fileEndpoint struct {
	Address  string            `json:"address"`
	Pod      string            `json:"pod"`
	SPIFFEID string            `json:"spiffeID"`
	Labels   map[string]string `json:"labels"`
	Ports    map[string]uint32 `json:"ports"`
}

type fileExternal struct {
	Host  string `json:"host"`
	Ports []struct {
		Name     string `json:"name"`
		Port     uint32 `json:"port"`
		Protocol string `json:"protocol"`
		TLSPort  uint32 `json:"tlsPort"`
	} `json:"ports"`
	CAFile string `json:"caFile"`
}

type fileGateway struct {
	Kind     GatewayKind       `json:"kind"`
	Selector map[string]string `json:"selector"`
	Servers  []struct {
		Port           uint32   `json:"port"`
		Hosts          []string `json:"hosts"`
		CredentialName string   `json:"credentialName"`
		Routes         []struct {
			Host       string `json:"host"`
			PathPrefix string `json:"pathPrefix"`
			Service    string `json:"service"`
			Port       uint32 `json:"port"`
		} `json:"routes"`
	} `json:"servers"`
	Service string `json:"service"`
	Port    uint32 `json:"port"`
}

type fileNode struct {
	Workloads []struct {
		SPIFFEID  string `json:"spiffeID"`
		Selectors struct {
			UID    *uint32 `json:"uid"`
			GID    *uint32 `json:"gid"`
			Path   string  `json:"path"`
			SHA256 string  `json:"sha256"`
			Netns  string  `json:"netns"`
		} `json:"selectors"`
	} `json:"workloads"`
}

type fileSecret struct {
	CertFile string `json:"certFile"`
	KeyFile  string `json:"keyFile"`
}

// IsMeshFile reports whether a directory entry is read by Dir.
func IsMeshFile(name string) bool {
	ext := strings.ToLower(filepath.Ext(name))
	return (ext == ".yaml" || ext == ".yml") && !strings.HasPrefix(filepath.Base(name), ".")
}

// Mesh reads every file, and parses the documents whose bytes it has not
// parsed before. Any error refuses the whole directory, naming the file and
// document.
func (d *Dir) Mesh() (*Mesh, error) {
	entries, err := os.ReadDir(d.Path)
	if err != nil {
		return nil, fmt.Errorf("mesh: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() && IsMeshFile(e.Name()) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	d.mu.Lock()
	cr := newCacheRead(d, d.cache)
	d.mu.Unlock()
	m := &Mesh{}
	var errs []error
	for _, n := range names {
		path := filepath.Join(d.Path, n)
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("mesh: %w", err))
			continue
		}
		if err := d.parse(m, path, data, cr); err != nil {
			errs = append(errs, err)
		}
	}
	d.mu.Lock()
	d.cache = cr.next
	d.mu.Unlock()
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if err := joinEndpoints(m); err != nil {
		return nil, err
	}
	m.Sort()
	return m, nil
}

// joinEndpoints makes a service endpoint and the Workload document of the
// same pod one workload, so that what the Workload says (its node,
// addresses, dataplane mode) holds for the endpoint too. Validate reports
// the two when their identities or labels differ. An ambient workload must
// list the addresses it serves at, or the node proxy would not know them.
//
// It indexes the endpoints' pods, not every workload: a mesh may list far
// more workloads (clients) than endpoints, and this runs on every read.
func joinEndpoints(m *Mesh) error {
	declared := map[string]*Workload{}
	for _, s := range m.Services {
		for _, e := range s.Endpoints {
			declared[e.Workload.Key()] = nil
		}
	}
	for _, w := range m.Workloads {
		if _, ok := declared[w.Key()]; ok {
			declared[w.Key()] = w
		}
	}
	var errs []error
	for _, s := range m.Services {
		for i := range s.Endpoints {
			e := &s.Endpoints[i]
			w := declared[e.Workload.Key()]
			if w == nil || w.ID != e.Workload.ID || !equalLabels(w.Labels, e.Workload.Labels) {
				continue
			}
			e.Workload = w
			if w.Mode() == DataPlaneAmbient && !slices.Contains(w.Addresses, e.Address) {
				errs = append(errs, fmt.Errorf("%w: service %s: endpoint %s of ambient workload %s is not among its addresses %v",
					ErrFile, s.Key(), e.Address, w.Key(), w.Addresses))
			}
		}
	}
	return errors.Join(errs...)
}

// parse reads mesh documents into m; origin names them in errors, and
// files named by TLSSecrets are relative to dir. A file, or a document,
// with the same bytes as one the cache read has met is not parsed again.
func (d *Dir) parse(m *Mesh, origin string, data []byte, cr *cacheRead) error {
	fk := docKey(sha256.Sum256(data))
	if f := cr.file(fk); f != nil {
		f.sorted.addTo(m)
		cr.keepFile(fk, f)
		return nil
	}
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var (
		errs []error
		docs []fileDocParse
		// whole: every document parsed, and none reads other files.
		whole = true
	)
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			cr.keepDocs(docs)
			return fmt.Errorf("%w: %s: %w", ErrFile, origin, err)
		}
		k := docKey(sha256.Sum256(raw))
		p := cr.doc(k)
		if p == nil {
			js, err := yaml.YAMLToJSON(raw)
			if err != nil {
				whole = false
				errs = append(errs, fmt.Errorf("%w: %s (document %d): %w", ErrFile, origin, doc, err))
				continue
			}
			var dm Mesh
			var readsFiles bool
			if t := bytes.TrimSpace(js); len(t) > 0 && !bytes.Equal(t, []byte("null")) {
				if err := d.parseDoc(&dm, js, &readsFiles); err != nil {
					whole = false
					errs = append(errs, fmt.Errorf("%w: %s (document %d): %w", ErrFile, origin, doc, err))
					continue
				}
			}
			p = newDocParse(&dm, readsFiles)
			if readsFiles {
				whole = false
			} else {
				cr.parsed[k] = p
			}
		}
		docs = append(docs, fileDocParse{key: k, parse: p})
	}
	if !whole {
		cr.keepDocs(docs)
		for _, doc := range docs {
			doc.parse.addTo(m)
		}
		return errors.Join(errs...)
	}
	f := newCachedFile(docs)
	cr.keepFile(fk, f)
	f.sorted.addTo(m)
	return nil
}

func strictJSON(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (d *Dir) domain() string {
	if d.Domain == "" {
		return DefaultDomain
	}
	return d.Domain
}

// parseDoc parses one document into m, and sets readsFiles when it read
// files besides its own bytes.
func (d *Dir) parseDoc(m *Mesh, js []byte, readsFiles *bool) error {
	var doc fileDoc
	if err := strictJSON(js, &doc); err != nil {
		return err
	}
	ns, name := doc.Metadata.Namespace, doc.Metadata.Name
	if ns == "" {
		ns = "default"
	}
	if name == "" {
		return errors.New("metadata.name is required")
	}
	spec := doc.Spec
	if len(spec) == 0 {
		spec = []byte("{}")
	}
	switch {
	case doc.APIVersion == APIVersion && doc.Kind == "Service":
		var fs struct {
			Hostname  string         `json:"hostname"`
			Address   string         `json:"address"`
			Ports     []filePort     `json:"ports"`
			Endpoints []fileEndpoint `json:"endpoints"`
		}
		if err := strictJSON(spec, &fs); err != nil {
			return err
		}
		s := &Service{Namespace: ns, Name: name, Hostname: fs.Hostname, Address: fs.Address}
		if s.Hostname == "" {
			s.Hostname = fmt.Sprintf("%s.%s.svc.%s", name, ns, d.domain())
		}
		for _, p := range fs.Ports {
			s.Ports = append(s.Ports, Port{Name: p.Name, Port: p.Port, Protocol: Protocol(strings.ToUpper(p.Protocol)), TargetPort: p.TargetPort})
		}
		for i, e := range fs.Endpoints {
			id, err := spiffeid.FromString(e.SPIFFEID)
			if err != nil {
				return fmt.Errorf("endpoints[%d].spiffeID %q: %w", i, e.SPIFFEID, err)
			}
			sa, ok := serviceAccount(id, ns)
			if !ok {
				return fmt.Errorf("endpoints[%d].spiffeID %s: want spiffe://TD/ns/%s/sa/SA", i, id, ns)
			}
			if e.Pod == "" {
				return fmt.Errorf("endpoints[%d].pod is required", i)
			}
			s.Endpoints = append(s.Endpoints, Endpoint{Address: e.Address, Ports: e.Ports, Workload: &Workload{
				Namespace: ns, Name: e.Pod, ServiceAccount: sa, ID: id, Labels: e.Labels,
			}})
		}
		m.Services = append(m.Services, s)
	case doc.APIVersion == APIVersion && doc.Kind == "Workload":
		var fw struct {
			SPIFFEID      string            `json:"spiffeID"`
			Labels        map[string]string `json:"labels"`
			Node          string            `json:"node"`
			Addresses     []string          `json:"addresses"`
			DataPlaneMode string            `json:"dataplaneMode"`
			Netns         string            `json:"netns"`
		}
		if err := strictJSON(spec, &fw); err != nil {
			return err
		}
		id, err := spiffeid.FromString(fw.SPIFFEID)
		if err != nil {
			return fmt.Errorf("spiffeID %q: %w", fw.SPIFFEID, err)
		}
		sa, ok := serviceAccount(id, ns)
		if !ok {
			return fmt.Errorf("spiffeID %s: want spiffe://TD/ns/%s/sa/SA", id, ns)
		}
		mode := DataPlaneSidecar
		if fw.DataPlaneMode != "" {
			if mode, err = ParseDataPlaneMode(fw.DataPlaneMode); err != nil {
				return fmt.Errorf("dataplaneMode: %w", err)
			}
		}
		m.Workloads = append(m.Workloads, &Workload{Namespace: ns, Name: name, ServiceAccount: sa, ID: id, Labels: fw.Labels,
			Node: fw.Node, Addresses: fw.Addresses, DataPlaneMode: mode, Netns: fw.Netns})
	case doc.APIVersion == APIVersion && doc.Kind == "ExternalService":
		var fx fileExternal
		if err := strictJSON(spec, &fx); err != nil {
			return err
		}
		x := &ExternalService{Namespace: ns, Name: name, Host: strings.ToLower(fx.Host), CAFile: d.rel(fx.CAFile)}
		for _, p := range fx.Ports {
			x.Ports = append(x.Ports, ExternalPort{Name: p.Name, Port: p.Port, Protocol: Protocol(strings.ToUpper(p.Protocol)), TLSPort: p.TLSPort})
		}
		m.External = append(m.External, x)
	case doc.APIVersion == APIVersion && doc.Kind == "Gateway":
		var fg fileGateway
		if err := strictJSON(spec, &fg); err != nil {
			return err
		}
		g := &Gateway{Namespace: ns, Name: name, Kind: fg.Kind, Selector: fg.Selector, Service: fg.Service, Port: fg.Port}
		for _, sv := range fg.Servers {
			s := Server{Port: sv.Port, Hosts: sv.Hosts, CredentialName: sv.CredentialName}
			for _, r := range sv.Routes {
				s.Routes = append(s.Routes, Route{Host: r.Host, PathPrefix: r.PathPrefix, Service: r.Service, Port: r.Port})
			}
			g.Servers = append(g.Servers, s)
		}
		m.Gateways = append(m.Gateways, g)
	case doc.APIVersion == APIVersion && doc.Kind == "TLSSecret":
		var fsec fileSecret
		if err := strictJSON(spec, &fsec); err != nil {
			return err
		}
		*readsFiles = true
		cert, err := os.ReadFile(d.rel(fsec.CertFile))
		if err != nil {
			return fmt.Errorf("certFile: %w", err)
		}
		key, err := os.ReadFile(d.rel(fsec.KeyFile))
		if err != nil {
			return fmt.Errorf("keyFile: %w", err)
		}
		m.Secrets = append(m.Secrets, &Secret{Namespace: ns, Name: name, CertPEM: cert, KeyPEM: key})
	case doc.APIVersion == APIVersion && doc.Kind == "Node":
		if doc.Metadata.Namespace != "" {
			return fmt.Errorf("node %s: a Node has no namespace (metadata.namespace %q)", name, doc.Metadata.Namespace)
		}
		var fn fileNode
		if err := strictJSON(spec, &fn); err != nil {
			return err
		}
		n := &Node{Name: name}
		for i, w := range fn.Workloads {
			id, err := spiffeid.FromString(w.SPIFFEID)
			if err != nil {
				return fmt.Errorf("workloads[%d].spiffeID %q: %w", i, w.SPIFFEID, err)
			}
			var sels []string
			if w.Selectors.UID != nil {
				sels = append(sels, SelectorUID+strconv.FormatUint(uint64(*w.Selectors.UID), 10))
			}
			if w.Selectors.GID != nil {
				sels = append(sels, SelectorGID+strconv.FormatUint(uint64(*w.Selectors.GID), 10))
			}
			if w.Selectors.Path != "" {
				sels = append(sels, SelectorPath+w.Selectors.Path)
			}
			if w.Selectors.SHA256 != "" {
				sels = append(sels, SelectorSHA256+w.Selectors.SHA256)
			}
			if w.Selectors.Netns != "" {
				sels = append(sels, SelectorNetns+w.Selectors.Netns)
			}
			if len(sels) == 0 {
				return fmt.Errorf("workloads[%d] (%s): selectors needs at least one of uid, gid, path, sha256, netns: without one every local process would receive %s", i, id, id)
			}
			for _, sel := range sels {
				if err := ValidateSelector(sel); err != nil {
					return fmt.Errorf("workloads[%d] (%s): %w", i, id, err)
				}
			}
			n.Workloads = append(n.Workloads, NodeWorkload{ID: id, Selectors: sels})
		}
		m.Nodes = append(m.Nodes, n)
	case strings.HasPrefix(doc.APIVersion, "networking.istio.io/") && doc.Kind == "ServiceEntry":
		se := &networkingv1alpha3.ServiceEntry{}
		if err := protojson.Unmarshal(spec, se); err != nil {
			return fmt.Errorf("spec: %w", err)
		}
		xs, ref := FromServiceEntry(ns, name, se)
		if ref != nil {
			m.Refusals = append(m.Refusals, *ref)
		}
		m.External = append(m.External, xs...)
	case strings.HasPrefix(doc.APIVersion, "security.istio.io/") && doc.Kind == "PeerAuthentication":
		pa := &securityv1beta1.PeerAuthentication{}
		if err := protojson.Unmarshal(spec, pa); err != nil {
			return fmt.Errorf("spec: %w", err)
		}
		if ref := CheckPeerAuthentication(ns, name, pa); ref != nil {
			m.Refusals = append(m.Refusals, *ref)
		}
	default:
		return fmt.Errorf("unknown kind %s %s", doc.APIVersion, doc.Kind)
	}
	return nil
}

func (d *Dir) rel(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(d.Path, p)
}

// serviceAccount returns SA of spiffe://TD/ns/NS/sa/SA when NS is ns.
func serviceAccount(id spiffeid.ID, ns string) (string, bool) {
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[1] != ns || parts[2] != "sa" || parts[3] == "" {
		return "", false
	}
	return parts[3], true
}

// Watch reports changes to the directory tree (mesh files and the files
// they name below it).
func (d *Dir) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	done, err := watch.Paths(ctx, []string{d.Path}, changed)
	if err != nil {
		return nil, fmt.Errorf("mesh: watching %s: %w", d.Path, err)
	}
	return done, nil
}
