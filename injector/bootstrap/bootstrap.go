// Package bootstrap builds the Envoy bootstrap the injector gives a proxy.
//
// The bootstrap is passed to Envoy with --config-yaml, so it lives in the
// container's arguments: no per-pod ConfigMap, and nothing a pod's own
// annotations could change after admission. Fields the pod learns only at
// run time (its name, namespace, IP and service account) are written as
// Kubernetes $(VAR) references, which the kubelet expands from the
// container's environment before Envoy starts.
//
// Envoy gets its configuration from the trustmesh xDS server by ADS over
// mTLS. Its certificate ("default") and trust bundle ("ROOTCA") come by SDS
// from the agent over a unix socket, and it accepts the xDS server only if
// the server's certificate carries the control plane's SPIFFE ID. The admin
// interface listens on localhost only; a static listener answers the
// kubelet's readiness probe with the admin interface's /ready.
package bootstrap

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	internallistenerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/bootstrap/internal_listener/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// NodeType is the first field of the node id, as in Istio.
type NodeType string

// Node types.
const (
	Sidecar NodeType = "sidecar"
	Router  NodeType = "router"
)

// Names of the SDS secrets the agent serves, and of the static clusters.
const (
	SecretCertificate = "default"
	SecretRoots       = "ROOTCA"
	ClusterXDS        = "xds-grpc"
	ClusterSDS        = "sds-grpc"
	ClusterAdmin      = "admin"
)

// Environment variables the $(VAR) references name. The injector defines
// them in the proxy container from the downward API.
const (
	EnvPodName        = "POD_NAME"
	EnvPodNamespace   = "POD_NAMESPACE"
	EnvInstanceIP     = "INSTANCE_IP"
	EnvServiceAccount = "SERVICE_ACCOUNT"
)

// Node metadata keys, Istio's names.
const (
	MetaNamespace      = "NAMESPACE"
	MetaName           = "NAME"
	MetaServiceAccount = "SERVICE_ACCOUNT"
	MetaLabels         = "LABELS"
	MetaInstanceIPs    = "INSTANCE_IPS"
	MetaTrustDomain    = "TRUST_DOMAIN"
)

// Config is one proxy's bootstrap.
type Config struct {
	Type NodeType
	// XDSAddress is the xDS server's host:port.
	XDSAddress string
	// XDSServerID is the SPIFFE ID the xDS server's certificate must carry.
	XDSServerID spiffeid.ID
	// SDSSocket is the agent's unix socket.
	SDSSocket string
	// AdminPort listens on 127.0.0.1 only.
	AdminPort int32
	// ReadinessPort serves GET /healthz/ready on all addresses.
	ReadinessPort int32
	// ClusterDomain is the cluster's DNS domain, for the node id.
	ClusterDomain string
	// TrustDomain goes into the node metadata.
	TrustDomain spiffeid.TrustDomain
	// Labels are the pod's labels, for the node metadata.
	Labels map[string]string
}

// ReadinessPath is the readiness probe's path on ReadinessPort.
const ReadinessPath = "/healthz/ready"

func ref(env string) string { return "$(" + env + ")" }

// NodeID is the node id for t, with $(VAR) references.
func NodeID(t NodeType, clusterDomain string) string {
	return fmt.Sprintf("%s~%s~%s.%s~%s.svc.%s", t, ref(EnvInstanceIP), ref(EnvPodName), ref(EnvPodNamespace),
		ref(EnvPodNamespace), clusterDomain)
}

// Build returns the bootstrap for cfg, checked with the protos' ValidateAll.
func Build(cfg Config) (*bootstrapv3.Bootstrap, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	xdsHost, xdsPortText, _ := net.SplitHostPort(cfg.XDSAddress)
	xdsPort, _ := strconv.ParseUint(xdsPortText, 10, 32)

	labels := make(map[string]any, len(cfg.Labels))
	for k, v := range cfg.Labels {
		labels[k] = v
	}
	meta, err := structpb.NewStruct(map[string]any{
		MetaNamespace:      ref(EnvPodNamespace),
		MetaName:           ref(EnvPodName),
		MetaServiceAccount: ref(EnvServiceAccount),
		MetaInstanceIPs:    ref(EnvInstanceIP),
		MetaTrustDomain:    cfg.TrustDomain.Name(),
		MetaLabels:         labels,
	})
	if err != nil {
		return nil, fmt.Errorf("bootstrap: node metadata: %w", err)
	}

	http2, err := anyOf(&upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
				},
			},
		},
	})
	if err != nil {
		return nil, err
	}
	httpOptions := map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2}

	sdsSource := &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType:             corev3.ApiConfigSource_GRPC,
			TransportApiVersion: corev3.ApiVersion_V3,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ClusterSDS},
			}}},
			SetNodeOnFirstMessageOnly: true,
		}},
	}
	xdsTLS, err := anyOf(&tlsv3.UpstreamTlsContext{
		Sni: xdsHost,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams:     &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
			AlpnProtocols: []string{"h2"},
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{
				Name: SecretCertificate, SdsConfig: sdsSource,
			}},
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext: &tlsv3.CertificateValidationContext{
						MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
							SanType: tlsv3.SubjectAltNameMatcher_URI,
							Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{
								Exact: cfg.XDSServerID.String(),
							}},
						}},
					},
					ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: SecretRoots, SdsConfig: sdsSource},
				},
			},
		},
	})
	if err != nil {
		return nil, err
	}

	ads := &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
	readiness, err := readinessListener(cfg.ReadinessPort)
	if err != nil {
		return nil, err
	}
	// Internal listeners carry a sidecar's HBONE tunnels to ambient pods
	// (xds/proxyconfig's connect_originate listeners); Envoy refuses them
	// unless the bootstrap loads this extension.
	internalListener, err := anyOf(&internallistenerv3.InternalListener{})
	if err != nil {
		return nil, err
	}
	b := &bootstrapv3.Bootstrap{
		BootstrapExtensions: []*corev3.TypedExtensionConfig{{
			Name:        "envoy.bootstrap.internal_listener",
			TypedConfig: internalListener,
		}},
		Node: &corev3.Node{
			Id:       NodeID(cfg.Type, cfg.ClusterDomain),
			Cluster:  ref(EnvServiceAccount) + "." + ref(EnvPodNamespace),
			Metadata: meta,
		},
		Admin: &bootstrapv3.Admin{
			Address: socketAddress("127.0.0.1", uint32(cfg.AdminPort)),
		},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			AdsConfig: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ClusterXDS},
				}}},
				SetNodeOnFirstMessageOnly: true,
			},
			LdsConfig: ads,
			CdsConfig: ads,
		},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Listeners: []*listenerv3.Listener{readiness},
			Clusters: []*clusterv3.Cluster{
				{
					Name:                          ClusterXDS,
					ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
					ConnectTimeout:                durationpb.New(time.Second),
					LoadAssignment:                loadAssignment(ClusterXDS, socketAddress(xdsHost, uint32(xdsPort))),
					TypedExtensionProtocolOptions: httpOptions,
					TransportSocket: &corev3.TransportSocket{
						Name:       "envoy.transport_sockets.tls",
						ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: xdsTLS},
					},
				},
				{
					Name:                          ClusterSDS,
					ClusterDiscoveryType:          &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
					ConnectTimeout:                durationpb.New(time.Second),
					LoadAssignment:                loadAssignment(ClusterSDS, pipeAddress(cfg.SDSSocket)),
					TypedExtensionProtocolOptions: httpOptions,
				},
				{
					Name:                 ClusterAdmin,
					ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
					ConnectTimeout:       durationpb.New(time.Second),
					LoadAssignment:       loadAssignment(ClusterAdmin, socketAddress("127.0.0.1", uint32(cfg.AdminPort))),
				},
			},
		},
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("bootstrap: invalid: %w", err)
	}
	return b, nil
}

func (cfg Config) check() error {
	var errs []error
	if cfg.Type != Sidecar && cfg.Type != Router {
		errs = append(errs, fmt.Errorf("node type %q is not sidecar or router", cfg.Type))
	}
	if host, port, err := net.SplitHostPort(cfg.XDSAddress); err != nil || host == "" || port == "" {
		errs = append(errs, fmt.Errorf("xDS address %q is not host:port", cfg.XDSAddress))
	} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		errs = append(errs, fmt.Errorf("xDS address %q has no valid port", cfg.XDSAddress))
	}
	if cfg.XDSServerID.IsZero() {
		errs = append(errs, errors.New("the xDS server's SPIFFE ID is required"))
	}
	if cfg.TrustDomain.IsZero() {
		errs = append(errs, errors.New("the trust domain is required"))
	}
	if cfg.SDSSocket == "" {
		errs = append(errs, errors.New("the agent's socket is required"))
	}
	for name, p := range map[string]int32{"admin": cfg.AdminPort, "readiness": cfg.ReadinessPort} {
		if p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("%s port %d is out of range", name, p))
		}
	}
	if cfg.ClusterDomain == "" {
		errs = append(errs, errors.New("the cluster domain is required"))
	}
	if len(errs) > 0 {
		return fmt.Errorf("bootstrap: %w", errors.Join(errs...))
	}
	return nil
}

// readinessListener answers GET /healthz/ready with the admin interface's
// /ready, which is 200 once Envoy has initialized from xDS. Nothing else of
// the admin interface is reachable through it.
func readinessListener(port int32) (*listenerv3.Listener, error) {
	router, err := anyOf(&routerv3.Router{})
	if err != nil {
		return nil, err
	}
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "readiness",
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: "readiness",
			VirtualHosts: []*routev3.VirtualHost{{
				Name:    "readiness",
				Domains: []string{"*"},
				Routes: []*routev3.Route{{
					Match: &routev3.RouteMatch{
						PathSpecifier: &routev3.RouteMatch_Path{Path: ReadinessPath},
						Headers: []*routev3.HeaderMatcher{{
							Name: ":method",
							HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
								MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "GET"},
							}},
						}},
					},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{
						ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: ClusterAdmin},
						PrefixRewrite:    "/ready",
					}},
				}},
			}},
		}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router},
		}},
	}
	if err := hcm.ValidateAll(); err != nil {
		return nil, fmt.Errorf("bootstrap: readiness listener: %w", err)
	}
	hcmAny, err := anyOf(hcm)
	if err != nil {
		return nil, err
	}
	return &listenerv3.Listener{
		Name:    "readiness",
		Address: socketAddress("0.0.0.0", uint32(port)),
		FilterChains: []*listenerv3.FilterChain{{
			Filters: []*listenerv3.Filter{{
				Name:       "envoy.filters.network.http_connection_manager",
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcmAny},
			}},
		}},
	}, nil
}

type validator interface {
	proto.Message
	ValidateAll() error
}

// anyOf validates m and packs it: ValidateAll does not look inside an Any.
func anyOf(m validator) (*anypb.Any, error) {
	if err := m.ValidateAll(); err != nil {
		return nil, fmt.Errorf("bootstrap: %T: %w", m, err)
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: pack %T: %w", m, err)
	}
	return a, nil
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func pipeAddress(path string) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: path}}}
}

func loadAssignment(name string, addr *corev3.Address) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{
		ClusterName: name,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: addr}},
			}},
		}},
	}
}

// JSON renders b as indented JSON with sorted keys, so that the same
// bootstrap always gives the same text (protojson varies its spacing on
// purpose) and a reviewer can read it in an injected pod.
func JSON(b *bootstrapv3.Bootstrap) (string, error) {
	raw, err := protojson.Marshal(b)
	if err != nil {
		return "", fmt.Errorf("bootstrap: marshal: %w", err)
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", fmt.Errorf("bootstrap: reparse: %w", err)
	}
	var out strings.Builder
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return "", fmt.Errorf("bootstrap: marshal: %w", err)
	}
	return strings.TrimSuffix(out.String(), "\n"), nil
}
