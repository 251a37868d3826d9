// Package ambientv1 holds the node proxy's xDS resource types (see
// ambient.proto) and the constants both ends of that stream share.
package ambientv1

// Type URLs of the resources, as ADS requests name them.
const (
	WorkloadType      = "type.googleapis.com/trustmesh.ambient.v1.Workload"
	AuthorizationType = "type.googleapis.com/trustmesh.ambient.v1.Authorization"
)

// AuthorizationName is the one Authorization resource's name.
const AuthorizationName = "policies"

// NodeIDPrefix starts a node proxy's xDS node id:
// "node~<node IP>~<node name>~<DNS domain>".
const NodeIDPrefix = "node~"

// The node proxy's ports inside each captured pod's network namespace, as
// ztunnel's: outbound capture, inbound plaintext capture, and HBONE.
const (
	OutboundPort         = 15001
	InboundPlaintextPort = 15006
	HBONEPort            = 15008
)
