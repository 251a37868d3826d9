// Package probe is the contract between the injector and the agent for the
// pod's own health probes.
//
// Envoy's inbound listeners accept only mesh mTLS, so a kubelet probe sent to
// an application port would be refused. The injector therefore rewrites each
// HTTP, TCP and gRPC probe into an HTTP GET on the agent's port (Port), at a
// path naming the container and the kind of probe, and hands the agent the
// original probes as JSON in the environment variable EnvVar. The agent runs
// as the proxy's uid, whose traffic is never captured, so it reaches the
// application directly and answers the kubelet with the outcome.
//
// The JSON form is Istio's ISTIO_KUBE_APP_PROBERS, so that the agent's
// prober can follow a well-known shape.
package probe

import (
	"encoding/json"
	"fmt"
)

// EnvVar holds the Probers, as JSON, in the agent container.
const EnvVar = "TRUSTMESH_APP_PROBERS"

// Port is the agent's monitoring and prober port, reachable on the pod IP
// and excluded from traffic capture. The agent serves /healthz there and the
// rewritten probes under /app-health/.
const Port = 15020

// Kind is the kind of a probe.
type Kind string

// Probe kinds, as they appear in the rewritten path.
const (
	Liveness  Kind = "livez"
	Readiness Kind = "readyz"
	Startup   Kind = "startupz"
)

// Path is the agent path a rewritten probe of container uses.
func Path(container string, kind Kind) string {
	return fmt.Sprintf("/app-health/%s/%s", container, kind)
}

// Probers maps each agent path to the application probe behind it.
type Probers map[string]*Prober

// Prober is one original probe. Exactly one of HTTPGet, TCPSocket and GRPC
// is set. Ports are numbers: the injector resolves named ports.
type Prober struct {
	HTTPGet        *HTTPGet   `json:"httpGet,omitempty"`
	TCPSocket      *TCPSocket `json:"tcpSocket,omitempty"`
	GRPC           *GRPC      `json:"grpc,omitempty"`
	TimeoutSeconds int32      `json:"timeoutSeconds,omitempty"`
}

// HTTPGet is an HTTP probe, as the kubelet would send it.
type HTTPGet struct {
	Path        string   `json:"path,omitempty"`
	Port        int32    `json:"port"`
	Host        string   `json:"host,omitempty"`
	Scheme      string   `json:"scheme,omitempty"`
	HTTPHeaders []Header `json:"httpHeaders,omitempty"`
}

// Header is an HTTP header of an HTTP probe.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// TCPSocket is a TCP connect probe.
type TCPSocket struct {
	Port int32  `json:"port"`
	Host string `json:"host,omitempty"`
}

// GRPC is a gRPC health-checking probe.
type GRPC struct {
	Port    int32   `json:"port"`
	Service *string `json:"service,omitempty"`
}

// Encode returns the JSON the agent reads from EnvVar. Keys are sorted, so
// the same probes always give the same text.
func (p Probers) Encode() (string, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return "", fmt.Errorf("probe: encode: %w", err)
	}
	return string(b), nil
}

// Decode parses the value of EnvVar and checks that every prober names
// exactly one probe with a valid port.
func Decode(s string) (Probers, error) {
	var p Probers
	if err := json.Unmarshal([]byte(s), &p); err != nil {
		return nil, fmt.Errorf("probe: decode %s: %w", EnvVar, err)
	}
	for path, pr := range p {
		if err := pr.validate(); err != nil {
			return nil, fmt.Errorf("probe: %s: %w", path, err)
		}
	}
	return p, nil
}

func (p *Prober) validate() error {
	if p == nil {
		return fmt.Errorf("empty prober")
	}
	n, port := 0, int32(0)
	if p.HTTPGet != nil {
		n, port = n+1, p.HTTPGet.Port
	}
	if p.TCPSocket != nil {
		n, port = n+1, p.TCPSocket.Port
	}
	if p.GRPC != nil {
		n, port = n+1, p.GRPC.Port
	}
	if n != 1 {
		return fmt.Errorf("a prober needs exactly one of httpGet, tcpSocket and grpc, has %d", n)
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("port %d is out of range", port)
	}
	return nil
}
