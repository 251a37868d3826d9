// Package injector adds trustmesh's data plane to pods: Envoy as a native
// sidecar with a bootstrap pointing at the xDS server, the agent that holds
// the workload's key and serves Envoy its certificate, a projected
// service-account token for the CA, an init container that captures the
// pod's traffic with iptables, and probes rewritten to go through the agent.
//
// The same Injector serves the mutating admission webhook (package
// webhook) and `trustmesh inject -f FILE`, which injects manifests offline.
//
// Which pods are injected is decided first by the webhook configuration's
// selectors (namespaces labelled trustmesh-injection=enabled), then here:
// pods in kube-system, kube-public, kube-node-lease and trustmesh's own
// namespace, host-network pods, pods that opt out, and pods already
// injected are left alone; a pod that cannot be injected safely is refused
// with a Refusal naming why. Pods in ambient mode (labelled, or in a
// namespace labelled, istio.io/dataplane-mode or trustmesh.io/dataplane-mode
// ambient) get no sidecar; those that ask get the node agent's Workload API
// socket.
package injector

import (
	"errors"
	"fmt"
)

// Labels and annotations.
const (
	// LabelInjection on a namespace, with value "enabled", opts it in.
	LabelInjection = "trustmesh-injection"
	// InjectKey, as a pod label or annotation with a false value, opts the
	// pod out. As a label it also keeps the webhook from being called.
	InjectKey = "trustmesh.io/inject"
	// AnnotationStatus records what was injected; injection is a no-op on
	// a pod that carries it.
	AnnotationStatus = "trustmesh.io/status"
	// AnnotationTemplate selects the template: "sidecar" (default) or
	// "gateway", for gateway Deployments whose main container is the proxy.
	AnnotationTemplate = "trustmesh.io/template"
	// Annotations asking to exclude traffic from capture, as
	// comma-separated lists, within the mesh config's limits.
	AnnotationExcludeInboundPorts  = "traffic.trustmesh.io/exclude-inbound-ports"
	AnnotationExcludeOutboundPorts = "traffic.trustmesh.io/exclude-outbound-ports"
	AnnotationExcludeOutboundCIDRs = "traffic.trustmesh.io/exclude-outbound-cidrs"
	// LabelProxy is set on injected pods: "sidecar" or "router".
	LabelProxy = "trustmesh.io/proxy"
	// LabelDataplaneMode and IstioLabelDataplaneMode, on a namespace or a
	// pod, with value DataplaneModeAmbient put its pods in ambient mode:
	// no sidecar. A pod labelled IstioLabelDataplaneMode (or
	// LabelDataplaneMode) DataplaneModeNone leaves ambient mode, and the
	// sidecar rules apply to it.
	LabelDataplaneMode      = "trustmesh.io/dataplane-mode"
	IstioLabelDataplaneMode = "istio.io/dataplane-mode"
	DataplaneModeAmbient    = "ambient"
	DataplaneModeNone       = "none"
	// AnnotationWorkloadAPI with value WorkloadAPINode on an ambient pod
	// asks for the node agent's Workload API socket: the host directory
	// NodeSocketDir mounted read-only and SPIFFE_ENDPOINT_SOCKET in every
	// container, nothing else.
	AnnotationWorkloadAPI = "trustmesh.io/workload-api"
	WorkloadAPINode       = "node"

	// Istio's names, honoured when the mesh config turns on Istio
	// compatibility, and recognised to refuse a second sidecar.
	IstioLabelInjection = "istio-injection"
	IstioInjectKey      = "sidecar.istio.io/inject"
	IstioStatus         = "sidecar.istio.io/status"
)

// AgentCommand is the binary the agent container runs: the agent alone
// (cmd/trustmesh-agent), which the trustmesh image holds beside trustmesh,
// so each pod maps a fraction of the control plane's binary.
const AgentCommand = "trustmesh-agent"

// Names of what the injector adds.
const (
	ContainerInit  = "trustmesh-init"
	ContainerAgent = "trustmesh-agent"
	ContainerProxy = "trustmesh-proxy"
	VolumeSocket   = "trustmesh-socket"
	VolumeToken    = "trustmesh-token"
	VolumeCARoot   = "trustmesh-ca-root"
	// RootCertConfigMap is the ConfigMap, in every namespace, holding the
	// trust bundle the agent starts with (key RootCertKey). Package
	// cabundle keeps it current.
	RootCertConfigMap = "trustmesh-ca-root-cert"
	RootCertKey       = "root-cert.pem"
	// VolumeNodeSocket is the host directory of the node agent's socket
	// in an ambient pod that asks for it.
	VolumeNodeSocket = "trustmesh-node-socket"
)

// Paths and ports inside the pod.
const (
	SocketDir     = "/run/trustmesh"
	SocketPath    = SocketDir + "/agent.sock"
	TokenDir      = "/var/run/secrets/tokens"
	TokenFile     = "trustmesh-token"
	CARootDir     = "/var/run/secrets/trustmesh"
	TokenLifetime = 43200 // seconds; the kubelet refreshes it at 80%

	// NodeSocketDir is the node agent's socket directory (trustmesh node
	// --socket), the same path on the host and in the pods that mount it.
	NodeSocketDir  = "/run/trustmesh/node"
	NodeSocketPath = NodeSocketDir + "/socket"
	// EnvWorkloadAPI is go-spiffe's (and SPIRE's) variable naming the
	// Workload API's address.
	EnvWorkloadAPI = "SPIFFE_ENDPOINT_SOCKET"

	PortOutbound  = 15001 // Envoy's outbound capture listener
	PortAdmin     = 15000 // Envoy's admin interface, localhost only
	PortInbound   = 15006 // Envoy's inbound capture listener
	PortAgent     = 15020 // the agent's /healthz, metrics and prober
	PortReadiness = 15021 // Envoy's readiness listener
)

// reservedPorts are bound by the proxy and agent in the pod's network
// namespace.
var reservedPorts = []int32{PortAdmin, PortOutbound, PortInbound, PortAgent, PortReadiness}

// namespaces that are never injected, besides the control plane's own.
var systemNamespaces = []string{"kube-system", "kube-public", "kube-node-lease"}

// SkipReason says why a pod was left alone.
type SkipReason string

// Reasons to leave a pod alone.
const (
	SkipExcludedNamespace SkipReason = "ExcludedNamespace"
	SkipHostNetwork       SkipReason = "HostNetwork"
	SkipOptedOut          SkipReason = "OptedOut"
	SkipAlreadyInjected   SkipReason = "AlreadyInjected"
	// SkipAmbient: the pod is in ambient mode and does not ask for the
	// node agent's Workload API.
	SkipAmbient SkipReason = "Ambient"
)

// Result is the outcome of injecting one pod that was not refused.
type Result struct {
	Injected bool
	// Skipped says why, when not Injected.
	Skipped SkipReason
	// Template is the template applied, when Injected.
	Template Template
}

// Code says why a pod was refused.
type Code string

// Refusal codes.
const (
	// RefusedIstioProxy: the pod already carries Istio's proxy.
	RefusedIstioProxy Code = "IstioProxyPresent"
	// RefusedPartial: the pod claims injection but lacks parts of it.
	RefusedPartial Code = "PartiallyInjected"
	// RefusedConflict: the pod uses a name or port the injector needs.
	RefusedConflict Code = "Conflict"
	// RefusedProxyUID: a container runs as the proxy's uid or gid, whose
	// traffic is not captured.
	RefusedProxyUID Code = "ProxyUID"
	// RefusedExclusion: a capture exclusion is malformed or outside the
	// mesh config's limits.
	RefusedExclusion Code = "ExclusionNotAllowed"
	// RefusedProbe: a probe cannot be rewritten to go through the agent.
	RefusedProbe Code = "UnsupportedProbe"
	// RefusedTemplate: the template annotation names no template, or the
	// pod does not fit it.
	RefusedTemplate Code = "Template"
	// RefusedWorkloadAPI: annotation trustmesh.io/workload-api has a value
	// other than "node", or is on a pod that is not in ambient mode.
	RefusedWorkloadAPI Code = "WorkloadAPI"
)

// Refusal is the error for a pod that must not start as it is.
type Refusal struct {
	Code Code
	Err  error
}

func (r *Refusal) Error() string { return fmt.Sprintf("injector: %s: %v", r.Code, r.Err) }
func (r *Refusal) Unwrap() error { return r.Err }

func refuse(code Code, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Err: fmt.Errorf(format, args...)}
}

// CodeOf returns the refusal code in err's chain, or "".
func CodeOf(err error) Code {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Code
	}
	return ""
}

// Template is how a pod is injected.
type Template string

// Templates.
const (
	// TemplateSidecar adds the capture init container, the agent and Envoy
	// as native sidecars.
	TemplateSidecar Template = "sidecar"
	// TemplateGateway completes a gateway pod whose container
	// trustmesh-proxy is Envoy: the agent as a native sidecar, no capture.
	TemplateGateway Template = "gateway"
	// TemplateWorkloadAPI is what an ambient pod that asks for it gets: the
	// node agent's socket and SPIFFE_ENDPOINT_SOCKET, nothing else. It is
	// reported in Results; no annotation selects it.
	TemplateWorkloadAPI Template = "workload-api"
)
