package kube

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkinginformers "istio.io/client-go/pkg/informers/externalversions/networking/v1"
	securityinformers "istio.io/client-go/pkg/informers/externalversions/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"

	"github.com/trustmesh/trustmesh/mesh"
)

type metav1ListOptions = metav1.ListOptions

type listers struct {
	services  coreinformers.ServiceInformer
	slices    discoveryinformers.EndpointSliceInformer
	pods      coreinformers.PodInformer
	secrets   coreinformers.SecretInformer
	entries   networkinginformers.ServiceEntryInformer
	gateways  networkinginformers.GatewayInformer
	routes    networkinginformers.VirtualServiceInformer
	peerAuths securityinformers.PeerAuthenticationInformer
	// namespaces give the labels that put a namespace's pods in ambient
	// mode.
	namespaces coreinformers.NamespaceInformer
}

// protocol derives a port's protocol as Istio does: appProtocol, else the
// port name's prefix ("http-...", "grpc-..."); anything else is TCP.
func protocol(p corev1.ServicePort) mesh.Protocol {
	name := strings.ToLower(p.Name)
	if p.AppProtocol != nil {
		name = strings.ToLower(*p.AppProtocol)
	}
	switch {
	case name == "http" || strings.HasPrefix(name, "http-"):
		return mesh.HTTP
	case name == "http2" || strings.HasPrefix(name, "http2-") || name == "kubernetes.io/h2c":
		return mesh.HTTP2
	case name == "grpc" || strings.HasPrefix(name, "grpc-"):
		return mesh.GRPC
	}
	return mesh.TCP
}

func (l *listers) mesh(td spiffeid.TrustDomain, domain string) (*mesh.Mesh, error) {
	m := &mesh.Mesh{}
	services, err := l.services.Lister().List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	workloads := map[string]*mesh.Workload{}
	for _, svc := range services {
		if svc.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		s, err := l.service(td, domain, svc, workloads)
		if err != nil {
			return nil, err
		}
		m.Services = append(m.Services, s)
	}
	// Every pod is a workload the mesh knows, whether or not it serves a
	// service or is ready yet: a proxy asks for its configuration before
	// its pod is ready.
	pods, err := l.pods.Lister().List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	for _, pod := range pods {
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		w, err := l.workload(td, pod.Namespace, pod.Name, workloads)
		if err != nil || w == nil {
			continue
		}
		m.Workloads = append(m.Workloads, w)
	}
	entries, err := l.entries.Lister().List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	for _, se := range entries {
		xs, ref := mesh.FromServiceEntry(se.Namespace, se.Name, &se.Spec)
		if ref != nil {
			m.Refusals = append(m.Refusals, *ref)
		}
		m.External = append(m.External, xs...)
	}
	pas, err := l.peerAuths.Lister().List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	for _, pa := range pas {
		if ref := mesh.CheckPeerAuthentication(pa.Namespace, pa.Name, &pa.Spec); ref != nil {
			m.Refusals = append(m.Refusals, *ref)
		}
	}
	if err := l.gatewaysInto(m, domain, services); err != nil {
		return nil, err
	}
	m.Refusals = append(m.Refusals, dropSharedAddresses(workloads)...)
	m.Sort()
	return m, nil
}

// dropSharedAddresses removes an address that two pods claim (a pod whose
// IP was given again while the old one is still listed) from both, and
// reports it: the node proxy must not send one pod's traffic to the other
// under the wrong identity. It goes back once one of them is gone.
func dropSharedAddresses(workloads map[string]*mesh.Workload) []mesh.Refusal {
	owners := map[string][]string{}
	for key, w := range workloads {
		for _, a := range w.Addresses {
			owners[a] = append(owners[a], key)
		}
	}
	var out []mesh.Refusal
	for a, keys := range owners {
		if len(keys) < 2 {
			continue
		}
		sort.Strings(keys)
		for _, k := range keys {
			w := workloads[k]
			w.Addresses = slices.DeleteFunc(w.Addresses, func(x string) bool { return x == a })
		}
		out = append(out, mesh.Refusal{Object: "Pod " + strings.Join(keys, ", "),
			Reason: fmt.Sprintf("pods share IP %s: none of them is reached by it until one is gone", a)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

func (l *listers) service(td spiffeid.TrustDomain, domain string, svc *corev1.Service, workloads map[string]*mesh.Workload) (*mesh.Service, error) {
	s := &mesh.Service{Namespace: svc.Namespace, Name: svc.Name, Hostname: fmt.Sprintf("%s.%s.svc.%s", svc.Name, svc.Namespace, domain)}
	if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
		s.Address = ip
	}
	for _, p := range svc.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue
		}
		mp := mesh.Port{Name: p.Name, Port: uint32(p.Port), Protocol: protocol(p)}
		if p.TargetPort.IntVal != 0 {
			mp.TargetPort = uint32(p.TargetPort.IntVal)
		}
		s.Ports = append(s.Ports, mp)
	}
	sel, err := labels.Parse(discoveryv1.LabelServiceName + "=" + svc.Name)
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	ess, err := l.slices.Lister().EndpointSlices(svc.Namespace).List(sel)
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: %w", err)
	}
	sort.Slice(ess, func(i, j int) bool { return ess[i].Name < ess[j].Name })
	for _, es := range ess {
		if es.AddressType != discoveryv1.AddressTypeIPv4 && es.AddressType != discoveryv1.AddressTypeIPv6 {
			continue
		}
		ports := map[string]uint32{}
		for _, p := range es.Ports {
			if p.Name != nil && p.Port != nil {
				ports[*p.Name] = uint32(*p.Port)
			}
		}
		for _, ep := range es.Endpoints {
			if len(ep.Addresses) == 0 || ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" ||
				(ep.Conditions.Ready != nil && !*ep.Conditions.Ready) {
				continue // no pod, no identity: not a mesh endpoint
			}
			w, err := l.workload(td, svc.Namespace, ep.TargetRef.Name, workloads)
			if err != nil || w == nil {
				continue
			}
			e := mesh.Endpoint{Address: ep.Addresses[0], Workload: w}
			for _, p := range s.Ports {
				if t, ok := ports[p.Name]; ok && t != p.Target() {
					if e.Ports == nil {
						e.Ports = map[string]uint32{}
					}
					e.Ports[p.Name] = t
				}
			}
			s.Endpoints = append(s.Endpoints, e)
		}
	}
	return s, nil
}

func (l *listers) workload(td spiffeid.TrustDomain, ns, name string, workloads map[string]*mesh.Workload) (*mesh.Workload, error) {
	key := ns + "/" + name
	if w, ok := workloads[key]; ok {
		return w, nil
	}
	pod, err := l.pods.Lister().Pods(ns).Get(name)
	if err != nil {
		return nil, err
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return nil, fmt.Errorf("mesh/kube: pod %s: %w", key, err)
	}
	var nsLabels map[string]string
	if nsObj, err := l.namespaces.Lister().Get(ns); err == nil {
		nsLabels = nsObj.Labels
	}
	w := &mesh.Workload{Namespace: ns, Name: name, ServiceAccount: sa, ID: id, Labels: pod.Labels, UID: string(pod.UID),
		Addresses: podAddresses(pod), DataPlaneMode: DataPlaneMode(pod, nsLabels)}
	// A finished pod runs on no node: its node agent may no longer hold its
	// identity.
	if pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed {
		w.Node = pod.Spec.NodeName
	}
	workloads[key] = w
	return w, nil
}

// gatewaysInto converts Istio Gateways (and the VirtualServices bound to
// them) and loads the TLS Secrets they name, from their own namespace
// only.
func (l *listers) gatewaysInto(m *mesh.Mesh, domain string, services []*corev1.Service) error {
	gws, err := l.gateways.Lister().List(labels.Everything())
	if err != nil {
		return fmt.Errorf("mesh/kube: %w", err)
	}
	vss, err := l.routes.Lister().List(labels.Everything())
	if err != nil {
		return fmt.Errorf("mesh/kube: %w", err)
	}
	for _, gw := range gws {
		spec := &gw.Spec
		in := &mesh.Gateway{Namespace: gw.Namespace, Name: gw.Name, Kind: mesh.Ingress, Selector: spec.GetSelector()}
		var egress *mesh.Gateway
		m.Refusals = append(m.Refusals, mesh.CheckGateway(gw.Namespace, gw.Name, spec)...)
		for _, sv := range spec.GetServers() {
			if !mesh.GatewayServerOK(sv) {
				continue // refused above
			}
			switch sv.GetTls().GetMode() {
			case networkingv1alpha3.ServerTLSSettings_SIMPLE:
				cred := sv.GetTls().GetCredentialName()
				var hosts []string
				for _, h := range sv.GetHosts() {
					if _, host, ok := strings.Cut(h, "/"); ok {
						h = host
					}
					hosts = append(hosts, h)
				}
				server := mesh.Server{Port: sv.GetPort().GetNumber(), Hosts: hosts, CredentialName: cred}
				server.Routes = routesFor(gw.Namespace, gw.Name, hosts, vss, domain, m)
				in.Servers = append(in.Servers, server)
				if sec, err := l.secrets.Lister().Secrets(gw.Namespace).Get(cred); err == nil && m.Secret(gw.Namespace, cred) == nil {
					m.Secrets = append(m.Secrets, &mesh.Secret{Namespace: gw.Namespace, Name: cred,
						CertPEM: sec.Data[corev1.TLSCertKey], KeyPEM: sec.Data[corev1.TLSPrivateKeyKey]})
				}
			case networkingv1alpha3.ServerTLSSettings_ISTIO_MUTUAL:
				if svc, port := serviceFor(gw.Namespace, spec.GetSelector(), sv.GetPort().GetNumber(), services); svc != "" {
					egress = &mesh.Gateway{Namespace: gw.Namespace, Name: gw.Name + "-egress", Kind: mesh.Egress,
						Selector: spec.GetSelector(), Service: svc, Port: port}
				}
			}
		}
		if len(in.Servers) > 0 {
			m.Gateways = append(m.Gateways, in)
		}
		if egress != nil {
			m.Gateways = append(m.Gateways, egress)
		}
	}
	return nil
}

// routesFor turns the HTTP routes of VirtualServices bound to a gateway
// into routes to mesh services.
func routesFor(ns, gw string, hosts []string, vss []*networkingv1.VirtualService, domain string, m *mesh.Mesh) []mesh.Route {
	var out []mesh.Route
	for _, vs := range vss {
		bound := false
		for _, g := range vs.Spec.GetGateways() {
			if g == gw && vs.Namespace == ns || g == ns+"/"+gw {
				bound = true
			}
		}
		if !bound {
			continue
		}
		for _, h := range vs.Spec.GetHosts() {
			if !slices.Contains(hosts, h) {
				continue
			}
			for _, r := range vs.Spec.GetHttp() {
				prefix := "/"
				if len(r.GetMatch()) > 0 && r.GetMatch()[0].GetUri().GetPrefix() != "" {
					prefix = r.GetMatch()[0].GetUri().GetPrefix()
				}
				if len(r.GetRoute()) == 0 {
					continue
				}
				d := r.GetRoute()[0].GetDestination()
				host := d.GetHost()
				if !strings.Contains(host, ".") {
					host = fmt.Sprintf("%s.%s.svc.%s", host, vs.Namespace, domain)
				}
				for _, s := range m.Services {
					if s.Hostname == host {
						out = append(out, mesh.Route{Host: h, PathPrefix: prefix, Service: s.Key(), Port: d.GetPort().GetNumber()})
					}
				}
			}
		}
	}
	return out
}

// serviceFor finds the Service in ns that selects the gateway's pods and
// exposes target port target; it returns its name and service port.
func serviceFor(ns string, selector map[string]string, target uint32, services []*corev1.Service) (string, uint32) {
	for _, svc := range services {
		if svc.Namespace != ns || len(svc.Spec.Selector) == 0 {
			continue
		}
		ok := true
		for k, v := range svc.Spec.Selector {
			if selector[k] != v {
				ok = false
			}
		}
		if !ok {
			continue
		}
		for _, p := range svc.Spec.Ports {
			if uint32(p.TargetPort.IntVal) == target || (p.TargetPort.IntVal == 0 && uint32(p.Port) == target) {
				return svc.Name, uint32(p.Port)
			}
		}
	}
	return "", 0
}
