package adversary

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"sync"
	"time"
)

// Identities in the shared mesh.
const (
	webID      = td + "/ns/shop/sa/web"
	gatewayID  = td + "/ns/istio-system/sa/istio-ingressgateway"
	attackerID = td + "/ns/istio-system/sa/attacker"
	victimID   = td + "/ns/victim/sa/victim"
	floodID    = td + "/ns/flood/sa/flood"
	adminID    = td + "/ns/kube-system/sa/admin"
)

// gatewayAddr is the ingress gateway's address in the mesh.
const gatewayAddr = "10.0.9.1"

const meshYAML = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.1.1, pod: web-0, spiffeID: "spiffe://cluster.local/ns/shop/sa/web", labels: {app: web}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: victim, namespace: victim}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.2.1, pod: victim-0, spiffeID: "spiffe://cluster.local/ns/victim/sa/victim", labels: {app: victim}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: flood, namespace: flood}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.3.1, pod: flood-0, spiffeID: "spiffe://cluster.local/ns/flood/sa/flood", labels: {app: flood}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  ports: [{name: https, port: 443, protocol: HTTP, targetPort: 8443}]
  endpoints:
  - {address: 10.0.9.1, pod: ingress-0, spiffeID: "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway", labels: {istio: ingressgateway}}
---
# Another service account in the gateway's namespace: the attacker's.
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: tools, namespace: istio-system}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.9.9, pod: tools-0, spiffeID: "spiffe://cluster.local/ns/istio-system/sa/attacker", labels: {app: tools}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  kind: ingress
  selector: {istio: ingressgateway}
  servers:
  - port: 8443
    hosts: [www.example.com]
    credentialName: www-cert
    routes:
    - {host: www.example.com, pathPrefix: /, service: shop/web, port: 8080}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: TLSSecret
metadata: {name: www-cert, namespace: istio-system}
spec: {certFile: www.crt, keyFile: www.key}
`

var (
	gatewayKeyOnce sync.Once
	gatewayCertPEM []byte
	gatewayKeyPEM  []byte
	gatewayKeyErr  error
)

// meshFiles is the shared mesh, with a fresh TLS key for the gateway: the
// secret the attacker of class 4 is after.
func meshFiles() (map[string][]byte, error) {
	gatewayKeyOnce.Do(func() {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			gatewayKeyErr = err
			return
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "www.example.com"},
			DNSNames: []string{"www.example.com"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			gatewayKeyErr = err
			return
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			gatewayKeyErr = err
			return
		}
		gatewayCertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		gatewayKeyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	})
	if gatewayKeyErr != nil {
		return nil, gatewayKeyErr
	}
	return map[string][]byte{"mesh.yaml": []byte(meshYAML), "www.crt": gatewayCertPEM, "www.key": gatewayKeyPEM}, nil
}

// policyFiles are the AuthorizationPolicies of the shared server, one
// namespace per attack so that they never interfere.
var policyFiles = map[string][]byte{
	// Class 1: negated matchers on absent attributes.
	"negated.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls, namespace: neg-peer}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: outsiders, namespace: neg-ns}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["neg-ns", "shop"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-key, namespace: neg-header}
spec:
  action: DENY
  rules:
  - when:
    - key: request.headers[x-api-key]
      notValues: ["key-1", "key-2"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sni, namespace: neg-sni}
spec:
  action: DENY
  rules:
  - when:
    - key: connection.sni
      notValues: ["*.example.com", "api.example.org"]
`),
	// IPv6 forms of every address rule.
	"ipv6.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ip-blocks, namespace: v6-ip}
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["fd00::/8", "10.0.0.0/8", "2001:db8:1::/48"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: remote-ip-blocks, namespace: v6-remote}
spec:
  action: DENY
  rules:
  - from:
    - source:
        remoteIpBlocks: ["2001:db8::/32"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ip-allow, namespace: v6-allow}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["fd00:1::/32"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ip-when, namespace: v6-when}
spec:
  action: DENY
  rules:
  - when:
    - key: source.ip
      values: ["fd00::/8"]
  - when:
    - key: remote.ip
      values: ["2001:db8::/32"]
  - when:
    - key: destination.ip
      values: ["fd01::/16"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v6-hosts, namespace: v6-host}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["[::1]", "[fd00::1]:8080"]
`),
	// Class 5: remote.ip from a header the client sets.
	"remote-ip.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-net, namespace: xff-deny}
spec:
  action: DENY
  rules:
  - from:
    - source:
        remoteIpBlocks: ["203.0.113.0/24"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: office-only, namespace: xff-allow}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        remoteIpBlocks: ["198.51.100.0/24"]
`),
	// Path spellings.
	"paths.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-paths, namespace: paths}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin", "/admin/*"]
`),
	// Class 6: host matching.
	"hosts.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: hosts}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["admin.example.com"]
`),
	// Peer IDs that are not well-formed SPIFFE IDs.
	"peer-id.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-banned, namespace: peer-ns}
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["banned"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-intruder, namespace: peer-sa}
spec:
  action: DENY
  rules:
  - from:
    - source:
        serviceAccounts: ["banned/intruder"]
`),
}
