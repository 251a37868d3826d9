package mesh

import (
	"crypto/sha256"
	"slices"
)

// docKey names a mesh file or document by the SHA-256 of its bytes.
type docKey [sha256.Size]byte

// docParse is what one mesh document parsed to. It is never changed once
// stored, and what it holds is shared by every Mesh built from it, so
// addTo copies whatever Dir.Mesh changes after parsing (a service's
// endpoints, which joinEndpoints rewrites, and its ports and endpoints,
// which Sort orders).
type docParse struct {
	m Mesh
	// readsFiles marks a document whose parse read other files (a
	// TLSSecret's certificate and key): it is never cached.
	readsFiles bool
}

// fileDocParse is one document of a cached file, in file order.
type fileDocParse struct {
	key   docKey
	parse *docParse
}

// docCache remembers what each file and document of a Dir parsed to, so
// that a read parses only the documents that changed. It is keyed by the
// bytes read (their SHA-256), never by a file's name, size or time, so that
// no rewrite can be served the old parse. It holds only what read nothing
// but its own bytes: a TLSSecret document, whose certificate and key files
// are read again on every read, is never cached, nor is a file that holds
// one, nor anything that failed to parse. A parse depends on the Dir's
// Path and Domain too, so a cache serves only a Dir with the values it was
// made with.
//
// A cache is never changed once Dir.Mesh installs it: each read builds the
// next one from the files and documents it met, so what is gone from the
// directory is dropped at once and a cache never holds more than one
// directory's worth.
type docCache struct {
	path, domain string
	files        map[docKey][]fileDocParse
	docs         map[docKey]*docParse
}

func newDocCache(d *Dir) *docCache {
	return &docCache{path: d.Path, domain: d.Domain, files: map[docKey][]fileDocParse{}, docs: map[docKey]*docParse{}}
}

// serves reports whether c holds parses for d as it is now.
func (c *docCache) serves(d *Dir) bool {
	return c != nil && c.path == d.Path && c.domain == d.Domain
}

// file returns the documents of a file met before in this read (c) or in
// last, keeping them in c; nil when neither has it.
func (c *docCache) file(d *Dir, k docKey, last *docCache) []fileDocParse {
	if docs, ok := c.files[k]; ok {
		return docs
	}
	if !last.serves(d) {
		return nil
	}
	docs, ok := last.files[k]
	if ok {
		c.files[k] = docs
	}
	return docs
}

// doc returns the parse of a document met before in this read (c) or in
// last, keeping it in c; nil when neither has it.
func (c *docCache) doc(d *Dir, k docKey, last *docCache) *docParse {
	if p := c.docs[k]; p != nil {
		return p
	}
	if !last.serves(d) {
		return nil
	}
	p := last.docs[k]
	if p != nil {
		c.docs[k] = p
	}
	return p
}

// addTo appends the document's objects to m, copying what Dir.Mesh changes.
func (p *docParse) addTo(m *Mesh) {
	for _, s := range p.m.Services {
		c := *s
		c.Ports = slices.Clone(s.Ports)
		c.Endpoints = slices.Clone(s.Endpoints)
		m.Services = append(m.Services, &c)
	}
	m.Workloads = append(m.Workloads, p.m.Workloads...)
	m.External = append(m.External, p.m.External...)
	m.Gateways = append(m.Gateways, p.m.Gateways...)
	m.Secrets = append(m.Secrets, p.m.Secrets...)
	m.Nodes = append(m.Nodes, p.m.Nodes...)
	m.Refusals = append(m.Refusals, p.m.Refusals...)
}
