// Package witnessoracle checks trustmesh's transparency formats against someone
// else's code.
package witnessoracle
