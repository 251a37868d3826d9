package injector

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/injector/capture"
)

// MeshConfig is the part of trustmesh's mesh config that shapes injection.
// The Helm chart renders it into the ConfigMap the control plane reads, and
// `trustmesh inject --mesh-config` reads the same file. Every field has a
// default; see DefaultMeshConfig.
type MeshConfig struct {
	// TrustDomain of the workloads' SPIFFE IDs.
	TrustDomain string `json:"trustDomain,omitempty"`
	// ClusterDomain is the cluster's DNS suffix.
	ClusterDomain string `json:"clusterDomain,omitempty"`
	// ControlPlaneNamespace is trustmesh's own namespace, never injected.
	ControlPlaneNamespace string `json:"controlPlaneNamespace,omitempty"`
	// ControlPlaneID is the SPIFFE ID the proxies require of the xDS
	// server. Default spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/trustmesh.
	ControlPlaneID string `json:"controlPlaneID,omitempty"`
	// CAAddress and XDSAddress are host:port of the control plane.
	CAAddress  string `json:"caAddress,omitempty"`
	XDSAddress string `json:"xdsAddress,omitempty"`
	// TokenAudience is the audience of the projected service-account
	// token, the one the CA accepts.
	TokenAudience string `json:"tokenAudience,omitempty"`
	// IstioCompatibility honours Istio's namespace label and the
	// sidecar.istio.io/inject label and annotation. Off by default.
	IstioCompatibility bool `json:"istioCompatibility,omitempty"`
	// ImagePullPolicy of the injected containers.
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy,omitempty"`

	Proxy     ProxyConfig     `json:"proxy"`
	Agent     ContainerConfig `json:"agent"`
	ProxyInit ContainerConfig `json:"proxyInit"`
	Capture   CaptureConfig   `json:"capture"`
}

// ContainerConfig is an injected container's image and resources.
type ContainerConfig struct {
	Image     string                      `json:"image,omitempty"`
	Resources corev1.ResourceRequirements `json:"resources,omitempty"`
}

// ProxyConfig is the Envoy container.
type ProxyConfig struct {
	ContainerConfig
	// UID and GID run Envoy and the agent; their traffic is not captured.
	UID int64 `json:"uid,omitempty"`
	GID int64 `json:"gid,omitempty"`
	// Concurrency is Envoy's worker threads.
	Concurrency int32 `json:"concurrency,omitempty"`
	// LogLevel is Envoy's log level.
	LogLevel string `json:"logLevel,omitempty"`
}

// CaptureConfig limits what a pod may exclude from capture by annotation.
// Each exclusion lets traffic bypass the mesh, so none is allowed unless
// listed here.
type CaptureConfig struct {
	// ExcludableInboundPorts and ExcludableOutboundPorts are ports or
	// ranges ("9090", "8000-8100").
	ExcludableInboundPorts  []string `json:"excludableInboundPorts,omitempty"`
	ExcludableOutboundPorts []string `json:"excludableOutboundPorts,omitempty"`
	// ExcludableOutboundCIDRs: a pod may exclude any CIDR inside one.
	ExcludableOutboundCIDRs []string `json:"excludableOutboundCIDRs,omitempty"`
}

// Defaults.
const (
	DefaultTrustDomain           = "cluster.local"
	DefaultClusterDomain         = "cluster.local"
	DefaultControlPlaneNamespace = identity.Namespace
	DefaultTokenAudience         = "istio-ca"
	DefaultProxyImage            = "docker.io/envoyproxy/envoy:v1.36.2"
	// DefaultImage is trustmesh's image: the agent, and the iptables init
	// container, which needs /bin/sh, iptables-restore and
	// ip6tables-restore in it.
	DefaultImage       = "ghcr.io/trustmesh/trustmesh:latest"
	DefaultProxyUID    = 1337
	DefaultConcurrency = 2
	DefaultLogLevel    = "warning"
)

// DefaultMeshConfig returns the defaults every unset field takes.
func DefaultMeshConfig() MeshConfig {
	return MeshConfig{}.withDefaults()
}

func resources(reqCPU, reqMem, limCPU, limMem string) corev1.ResourceRequirements {
	r := corev1.ResourceRequirements{
		Requests: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse(reqCPU), corev1.ResourceMemory: resource.MustParse(reqMem),
		},
		Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse(limMem)},
	}
	if limCPU != "" {
		r.Limits[corev1.ResourceCPU] = resource.MustParse(limCPU)
	}
	return r
}

func (m MeshConfig) withDefaults() MeshConfig {
	if m.TrustDomain == "" {
		m.TrustDomain = DefaultTrustDomain
	}
	if m.ClusterDomain == "" {
		m.ClusterDomain = DefaultClusterDomain
	}
	if m.ControlPlaneNamespace == "" {
		m.ControlPlaneNamespace = DefaultControlPlaneNamespace
	}
	if m.ControlPlaneID == "" {
		m.ControlPlaneID = identity.ID(m.TrustDomain, m.ControlPlaneNamespace)
	}
	if m.CAAddress == "" {
		m.CAAddress = identity.Host(m.ControlPlaneNamespace) + ":15012"
	}
	if m.XDSAddress == "" {
		m.XDSAddress = m.CAAddress
	}
	if m.TokenAudience == "" {
		m.TokenAudience = DefaultTokenAudience
	}
	if m.ImagePullPolicy == "" {
		m.ImagePullPolicy = corev1.PullIfNotPresent
	}
	if m.Proxy.Image == "" {
		m.Proxy.Image = DefaultProxyImage
	}
	if isEmpty(m.Proxy.Resources) {
		m.Proxy.Resources = resources("100m", "128Mi", "2", "1Gi")
	}
	if m.Proxy.UID == 0 {
		m.Proxy.UID = DefaultProxyUID
	}
	if m.Proxy.GID == 0 {
		m.Proxy.GID = m.Proxy.UID
	}
	if m.Proxy.Concurrency == 0 {
		m.Proxy.Concurrency = DefaultConcurrency
	}
	if m.Proxy.LogLevel == "" {
		m.Proxy.LogLevel = DefaultLogLevel
	}
	if m.Agent.Image == "" {
		m.Agent.Image = DefaultImage
	}
	if isEmpty(m.Agent.Resources) {
		m.Agent.Resources = resources("10m", "32Mi", "", "128Mi")
	}
	if m.ProxyInit.Image == "" {
		m.ProxyInit.Image = m.Agent.Image
	}
	if isEmpty(m.ProxyInit.Resources) {
		m.ProxyInit.Resources = resources("10m", "16Mi", "100m", "64Mi")
	}
	return m
}

func isEmpty(r corev1.ResourceRequirements) bool {
	return len(r.Requests) == 0 && len(r.Limits) == 0 && len(r.Claims) == 0
}

// ParseMeshConfig parses YAML or JSON, refusing unknown fields.
func ParseMeshConfig(data []byte) (MeshConfig, error) {
	var m MeshConfig
	if err := yaml.UnmarshalStrict(data, &m); err != nil {
		return MeshConfig{}, fmt.Errorf("injector: mesh config: %w", err)
	}
	return m, nil
}

// LoadMeshConfig reads a mesh config file; an empty path gives the zero
// config, which New fills with defaults.
func LoadMeshConfig(path string) (MeshConfig, error) {
	if path == "" {
		return MeshConfig{}, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return MeshConfig{}, fmt.Errorf("injector: mesh config: %w", err)
	}
	return ParseMeshConfig(data)
}

// settings is a MeshConfig with defaults, checked and parsed.
type settings struct {
	MeshConfig
	td     spiffeid.TrustDomain
	cpID   spiffeid.ID
	limits capture.Limits
}

var envoyLogLevels = []string{"trace", "debug", "info", "warning", "warn", "error", "critical", "off"}

func (m MeshConfig) validate() (*settings, error) {
	m = m.withDefaults()
	s := &settings{MeshConfig: m}
	var errs []error
	var err error
	if s.td, err = spiffeid.TrustDomainFromString(m.TrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("trust domain %q: %w", m.TrustDomain, err))
	}
	if s.cpID, err = spiffeid.FromString(m.ControlPlaneID); err != nil {
		errs = append(errs, fmt.Errorf("control plane ID %q: %w", m.ControlPlaneID, err))
	} else if !s.td.IsZero() && s.cpID.TrustDomain() != s.td {
		errs = append(errs, fmt.Errorf("control plane ID %s is outside trust domain %s", s.cpID, s.td))
	}
	for name, addr := range map[string]string{"CA": m.CAAddress, "xDS": m.XDSAddress} {
		host, port, err := net.SplitHostPort(addr)
		if err == nil {
			if n, perr := strconv.ParseUint(port, 10, 16); perr != nil || n == 0 {
				err = fmt.Errorf("port %q", port)
			} else if host == "" {
				err = errors.New("no host")
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s address %q is not host:port: %w", name, addr, err))
		}
	}
	if strings.Contains(m.ClusterDomain, "$") || strings.Contains(m.TrustDomain, "$") {
		errs = append(errs, errors.New("cluster and trust domains may not contain '$'"))
	}
	switch m.ImagePullPolicy {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		errs = append(errs, fmt.Errorf("image pull policy %q is not Always, IfNotPresent or Never", m.ImagePullPolicy))
	}
	if m.Proxy.UID < 1 || m.Proxy.GID < 1 {
		errs = append(errs, fmt.Errorf("proxy uid %d and gid %d must be positive (never root)", m.Proxy.UID, m.Proxy.GID))
	}
	if m.Proxy.Concurrency < 0 {
		errs = append(errs, fmt.Errorf("proxy concurrency %d is negative", m.Proxy.Concurrency))
	}
	if !slices.Contains(envoyLogLevels, m.Proxy.LogLevel) {
		errs = append(errs, fmt.Errorf("proxy log level %q is not one of %s", m.Proxy.LogLevel, strings.Join(envoyLogLevels, ", ")))
	}
	for name, img := range map[string]string{"proxy": m.Proxy.Image, "agent": m.Agent.Image, "proxy init": m.ProxyInit.Image} {
		if strings.ContainsAny(img, " \t\n$") {
			errs = append(errs, fmt.Errorf("%s image %q is not an image reference", name, img))
		}
	}
	if s.limits, err = capture.ParseLimits(m.Capture.ExcludableInboundPorts, m.Capture.ExcludableOutboundPorts,
		m.Capture.ExcludableOutboundCIDRs); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("injector: invalid mesh config: %w", errors.Join(errs...))
	}
	return s, nil
}
