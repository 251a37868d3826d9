// Package e2e holds trustmesh's end-to-end tests: the control plane
// assembled by package controlplane, run in-process on loopback, with real
// agents and real grpc-go xDS workloads in front of it.
//
// The tests reach the control plane only as an operator and a workload
// would: join tokens and the trust bundle through the CA's operator API
// (ca/admin) on its data directory, certificates and xDS over its port.
// Apart from test/adversary, which runs the built binary, this is the one
// package that may import controlplane (see ARCHITECTURE.md).
package e2e
