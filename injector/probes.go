package injector

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trustmesh/trustmesh/api/probe"
)

// rewriteProbes points every HTTP, TCP and gRPC probe of the application's
// containers (and of its own native sidecars) at the agent, and returns the
// original probes for the agent to run. Exec probes run inside the
// container and are left alone.
func rewriteProbes(spec *corev1.PodSpec) (probe.Probers, error) {
	probers := probe.Probers{}
	rewrite := func(c *corev1.Container) error {
		for _, p := range []struct {
			kind  probe.Kind
			probe *corev1.Probe
		}{{probe.Liveness, c.LivenessProbe}, {probe.Readiness, c.ReadinessProbe}, {probe.Startup, c.StartupProbe}} {
			if p.probe == nil || p.probe.Exec != nil {
				continue
			}
			pr, err := prober(c, p.probe)
			if err != nil {
				return refuse(RefusedProbe, "container %s: %s probe: %w", c.Name, p.kind, err)
			}
			path := probe.Path(c.Name, p.kind)
			probers[path] = pr
			p.probe.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: path, Port: intstr.FromInt32(probe.Port), Scheme: corev1.URISchemeHTTP,
			}}
		}
		return nil
	}
	for i := range spec.InitContainers {
		c := &spec.InitContainers[i]
		if c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			if err := rewrite(c); err != nil {
				return nil, err
			}
		}
	}
	for i := range spec.Containers {
		if err := rewrite(&spec.Containers[i]); err != nil {
			return nil, err
		}
	}
	return probers, nil
}

func prober(c *corev1.Container, p *corev1.Probe) (*probe.Prober, error) {
	out := &probe.Prober{TimeoutSeconds: p.TimeoutSeconds}
	switch h := p.ProbeHandler; {
	case h.HTTPGet != nil:
		port, err := resolvePort(c, h.HTTPGet.Port)
		if err != nil {
			return nil, err
		}
		g := &probe.HTTPGet{Path: h.HTTPGet.Path, Port: port, Host: h.HTTPGet.Host, Scheme: string(h.HTTPGet.Scheme)}
		for _, hd := range h.HTTPGet.HTTPHeaders {
			g.HTTPHeaders = append(g.HTTPHeaders, probe.Header{Name: hd.Name, Value: hd.Value})
		}
		out.HTTPGet = g
	case h.TCPSocket != nil:
		port, err := resolvePort(c, h.TCPSocket.Port)
		if err != nil {
			return nil, err
		}
		out.TCPSocket = &probe.TCPSocket{Port: port, Host: h.TCPSocket.Host}
	case h.GRPC != nil:
		out.GRPC = &probe.GRPC{Port: h.GRPC.Port, Service: h.GRPC.Service}
	default:
		return nil, fmt.Errorf("it names no handler")
	}
	if err := checkProbePort(out); err != nil {
		return nil, err
	}
	return out, nil
}

func checkProbePort(p *probe.Prober) error {
	var port int32
	switch {
	case p.HTTPGet != nil:
		port = p.HTTPGet.Port
	case p.TCPSocket != nil:
		port = p.TCPSocket.Port
	case p.GRPC != nil:
		port = p.GRPC.Port
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("port %d is out of range", port)
	}
	if slices.Contains(reservedPorts, port) {
		return fmt.Errorf("port %d is the trustmesh proxy's", port)
	}
	return nil
}

// resolvePort turns a probe's port, a number or the name of one of the
// container's ports, into a number, as the kubelet would.
func resolvePort(c *corev1.Container, port intstr.IntOrString) (int32, error) {
	if port.Type == intstr.Int {
		return port.IntVal, nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return p.ContainerPort, nil
		}
	}
	return 0, fmt.Errorf("port %q is not a port of the container", port.StrVal)
}
