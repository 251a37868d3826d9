// Package identity names the trustmesh control plane as workloads, proxies
// and the control plane itself know it: the namespace and service account
// it runs as, its Service, and the SPIFFE ID its certificates carry. It is
// the one place these defaults live, so that the CA (which reserves the
// ID), the xDS server (which names it as the ext_authz peer), the injector
// (which tells proxies whom to trust) and the agent agree.
package identity

import "fmt"

const (
	// Namespace is the control plane's namespace unless told otherwise.
	Namespace = "trustmesh-system"
	// ServiceAccount is the service account the control plane runs as,
	// and the name of its Service.
	ServiceAccount = "trustmesh"
	// AuthzPort is the ext_authz port on the control plane's Service.
	AuthzPort = 9191
)

// ID is the control plane's SPIFFE ID in trustDomain when it runs in
// namespace; an empty namespace means Namespace.
func ID(trustDomain, namespace string) string {
	if namespace == "" {
		namespace = Namespace
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, namespace, ServiceAccount)
}

// Host is the DNS name of the control plane's Service in namespace; an
// empty namespace means Namespace.
func Host(namespace string) string {
	if namespace == "" {
		namespace = Namespace
	}
	return ServiceAccount + "." + namespace + ".svc"
}

// AuthzAddress is the ext_authz service of the control plane in namespace,
// as proxies reach it.
func AuthzAddress(namespace string) string {
	return fmt.Sprintf("%s:%d", Host(namespace), AuthzPort)
}
