// Package examples embeds the demo's mesh, so that `trustmesh demo` runs
// from any directory, not only from the root of a checkout.
package examples

import (
	"embed"
	"io/fs"
)

//go:embed mesh
var files embed.FS

// Mesh is the demo's mesh as examples/mesh holds it: the mesh files at its
// root and the AuthorizationPolicies under policies/.
func Mesh() fs.FS {
	m, err := fs.Sub(files, "mesh")
	if err != nil {
		panic(err) // "mesh" is a valid path, embedded above
	}
	return m
}
