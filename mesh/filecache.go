package mesh

import (
	"crypto/sha256"
	"slices"
	"sync"
)

// docKey names a mesh file or document by the SHA-256 of its bytes.
type docKey [sha256.Size]byte

// docParse is what one mesh document parsed to: its objects (*Service,
// *Workload, *ExternalService, *Gateway, *Secret, *Node, Refusal), kept
// small because a cache holds one per document. It is never changed once
// made, and its objects are shared by every Mesh built from it, so addTo
// copies whatever Dir.Mesh changes after parsing: a service's endpoints,
// which joinEndpoints rewrites, and its ports, which Sort orders.
type docParse struct {
	objects []any
	// readsFiles marks a document whose parse read other files (a
	// TLSSecret's certificate and key): it is never cached.
	readsFiles bool
}

// newDocParse keeps what parseDoc put in m.
func newDocParse(m *Mesh, readsFiles bool) *docParse {
	p := &docParse{readsFiles: readsFiles}
	for _, s := range m.Services {
		p.objects = append(p.objects, s)
	}
	for _, w := range m.Workloads {
		p.objects = append(p.objects, w)
	}
	for _, x := range m.External {
		p.objects = append(p.objects, x)
	}
	for _, g := range m.Gateways {
		p.objects = append(p.objects, g)
	}
	for _, s := range m.Secrets {
		p.objects = append(p.objects, s)
	}
	for _, n := range m.Nodes {
		p.objects = append(p.objects, n)
	}
	for _, r := range m.Refusals {
		p.objects = append(p.objects, r)
	}
	return p
}

// addTo appends the document's objects to m, copying what Dir.Mesh changes.
func (p *docParse) addTo(m *Mesh) {
	for _, o := range p.objects {
		switch o := o.(type) {
		case *Service:
			c := *o
			c.Ports = slices.Clone(o.Ports)
			c.Endpoints = slices.Clone(o.Endpoints)
			m.Services = append(m.Services, &c)
		case *Workload:
			m.Workloads = append(m.Workloads, o)
		case *ExternalService:
			m.External = append(m.External, o)
		case *Gateway:
			m.Gateways = append(m.Gateways, o)
		case *Secret:
			m.Secrets = append(m.Secrets, o)
		case *Node:
			m.Nodes = append(m.Nodes, o)
		case Refusal:
			m.Refusals = append(m.Refusals, o)
		default:
			panic("mesh: a document parsed to an unknown object")
		}
	}
}

// fileDocParse is one document of a file, in file order.
type fileDocParse struct {
	key   docKey
	parse *docParse
}

// cachedFile is a file that parsed whole and reads no other file: its
// documents, and all their objects in the order Mesh.Sort gives them, so
// that a mesh built mostly of unchanged files reaches Sort nearly sorted
// (Sort was half of a read after a one-file change at 20,000 workloads).
type cachedFile struct {
	docs   []fileDocParse
	sorted *docParse
}

func newCachedFile(docs []fileDocParse) *cachedFile {
	var m Mesh
	for _, doc := range docs {
		doc.parse.addTo(&m)
	}
	m.Sort()
	return &cachedFile{docs: docs, sorted: newDocParse(&m, false)}
}

// docCache remembers what each file of a Dir parsed to, document by
// document, so that a read parses only the documents that changed. It is
// keyed by the bytes read (their SHA-256), never by a file's name, size or
// time, so that no rewrite can be served the old parse. It holds only what
// read nothing but its own bytes: a TLSSecret document, whose certificate
// and key files are read again on every read, is never cached, nor is
// anything that failed to parse. A parse depends on the Dir's Path and
// Domain too, so a cache serves only a Dir with the values it was made
// with.
//
// A cache is never changed once Dir.Mesh installs it (but for its index,
// built once): each read builds the next one from the files and documents
// it met, so what is gone from the directory is dropped at once and a
// cache never holds more than one directory's worth.
type docCache struct {
	path, domain string
	// files are the files that parsed whole and read no other file.
	files map[docKey]*cachedFile
	// loose are the documents that parsed of the files that did not.
	loose []fileDocParse

	// byKey indexes every document of files and loose, built when a read
	// first needs a document of a file that changed.
	indexOnce sync.Once
	byKey     map[docKey]*docParse
}

func newDocCache(d *Dir) *docCache {
	return &docCache{path: d.Path, domain: d.Domain, files: map[docKey]*cachedFile{}}
}

// serves reports whether c holds parses for d as it is now.
func (c *docCache) serves(d *Dir) bool {
	return c != nil && c.path == d.Path && c.domain == d.Domain
}

// file returns a file that c holds for d, nil if none.
func (c *docCache) file(d *Dir, k docKey) *cachedFile {
	if !c.serves(d) {
		return nil
	}
	return c.files[k]
}

// doc returns the parse of a document that c holds for d, nil if none.
func (c *docCache) doc(d *Dir, k docKey) *docParse {
	if !c.serves(d) {
		return nil
	}
	c.indexOnce.Do(func() {
		c.byKey = map[docKey]*docParse{}
		for _, f := range c.files {
			for _, doc := range f.docs {
				c.byKey[doc.key] = doc.parse
			}
		}
		for _, doc := range c.loose {
			c.byKey[doc.key] = doc.parse
		}
	})
	return c.byKey[k]
}

// cacheRead is one read's use of the caches: it finds files and documents
// among those the last read kept or this read parsed, and builds the
// cache the next read will use.
type cacheRead struct {
	d    *Dir
	last *docCache
	next *docCache
	// parsed are the documents this read parsed and may cache.
	parsed map[docKey]*docParse
}

func newCacheRead(d *Dir, last *docCache) *cacheRead {
	return &cacheRead{d: d, last: last, next: newDocCache(d), parsed: map[docKey]*docParse{}}
}

// file returns a file, nil when it has not been met as it is.
func (r *cacheRead) file(k docKey) *cachedFile {
	if f := r.next.files[k]; f != nil {
		return f
	}
	return r.last.file(r.d, k)
}

// doc returns a document's parse, nil when it has not been met as it is.
func (r *cacheRead) doc(k docKey) *docParse {
	if p := r.parsed[k]; p != nil {
		return p
	}
	return r.last.doc(r.d, k)
}

// keepFile keeps a file for the next read.
func (r *cacheRead) keepFile(k docKey, f *cachedFile) { r.next.files[k] = f }

// keepDocs keeps for the next read the documents of a file that did not
// parse whole or reads other files, but for those that read other files.
func (r *cacheRead) keepDocs(docs []fileDocParse) {
	for _, doc := range docs {
		if !doc.parse.readsFiles {
			r.next.loose = append(r.next.loose, doc)
		}
	}
}
