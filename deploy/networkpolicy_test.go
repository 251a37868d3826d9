package deploy_test

import (
	"errors"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
)

// egressPolicy renders the chart with values and returns the
// NetworkPolicy of namespace ns.
func egressPolicy(t *testing.T, values map[string]any, ns string) networkingv1.NetworkPolicy {
	t.Helper()
	objs, err := deploy.Render(deploy.RenderOptions{Values: values})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() != "NetworkPolicy" || o.GetNamespace() != ns {
			continue
		}
		var np networkingv1.NetworkPolicy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &np); err != nil {
			t.Fatal(err)
		}
		return np
	}
	t.Fatalf("no NetworkPolicy in %s", ns)
	return networkingv1.NetworkPolicy{}
}

// collectorRule returns the egress rule that reaches namespace ns, nil
// when there is none.
func collectorRule(np networkingv1.NetworkPolicy, ns string) *networkingv1.NetworkPolicyEgressRule {
	for i, r := range np.Spec.Egress {
		for _, p := range r.To {
			if p.NamespaceSelector != nil && p.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] == ns {
				return &np.Spec.Egress[i]
			}
		}
	}
	return nil
}

// TestNetworkPolicyReachesTheTracingCollector: with the NetworkPolicies on,
// the proxies of the listed namespaces may reach a collector outside the
// mesh that tracing.collectorPods names, on the collector's port only;
// without collectorPods (or without a collector) no such rule appears.
func TestNetworkPolicyReachesTheTracingCollector(t *testing.T) {
	netpol := map[string]any{"enabled": true, "namespaces": []any{"shop"}}
	pods := map[string]any{"namespace": "observability", "podLabels": map[string]any{"app": "otel-collector"}}

	np := egressPolicy(t, map[string]any{"networkPolicy": netpol, "tracing": map[string]any{
		"collector": "otel-collector.observability:4317", "collectorPods": pods}}, "shop")
	r := collectorRule(np, "observability")
	if r == nil {
		t.Fatalf("no egress rule to the collector's namespace: %+v", np.Spec.Egress)
	}
	if len(r.To) != 1 || r.To[0].PodSelector == nil || r.To[0].PodSelector.MatchLabels["app"] != "otel-collector" {
		t.Errorf("collector rule selects %+v, want the pods labelled app=otel-collector", r.To)
	}
	if len(r.Ports) != 1 || r.Ports[0].Port == nil || r.Ports[0].Port.IntValue() != 4317 {
		t.Errorf("collector rule ports %+v, want TCP 4317 only", r.Ports)
	}

	// An IPv6 literal's port.
	np = egressPolicy(t, map[string]any{"networkPolicy": netpol, "tracing": map[string]any{
		"collector": "[fd00::1]:14317", "collectorPods": pods}}, "shop")
	if r := collectorRule(np, "observability"); r == nil || len(r.Ports) != 1 || r.Ports[0].Port.IntValue() != 14317 {
		t.Errorf("collector rule for [fd00::1]:14317: %+v", r)
	}

	for name, tracing := range map[string]map[string]any{
		"no collectorPods": {"collector": "otel-collector.observability:4317"},
		"no collector":     {"collectorPods": pods},
	} {
		np := egressPolicy(t, map[string]any{"networkPolicy": netpol, "tracing": tracing}, "shop")
		if r := collectorRule(np, "observability"); r != nil || len(np.Spec.Egress) != 3 {
			t.Errorf("%s: egress %+v, want only the mesh, control plane and DNS rules", name, np.Spec.Egress)
		}
	}

	_, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"tracing": map[string]any{"collectorPods": map[string]any{"namespace": "Not A Namespace"}}}})
	if !errors.Is(err, deploy.ErrInvalidValues) {
		t.Errorf("a bad collectorPods.namespace: error %v, want ErrInvalidValues", err)
	}
}

// TestNetworkPolicyReachesAmbientPods: with the ambient profile, the
// listed namespaces' pods may reach ambient pods (by either label, on the
// pod or its namespace) on the HBONE port 15008 only, which is all they
// accept; without the profile, no such rule.
func TestNetworkPolicyReachesAmbientPods(t *testing.T) {
	hbone := func(np networkingv1.NetworkPolicy) map[string]bool {
		found := map[string]bool{}
		for _, r := range np.Spec.Egress {
			for _, p := range r.To {
				var labels map[string]string
				kind := "namespace"
				switch {
				case p.PodSelector != nil && p.NamespaceSelector != nil && len(p.NamespaceSelector.MatchLabels) == 0:
					labels, kind = p.PodSelector.MatchLabels, "pod"
				case p.PodSelector == nil && p.NamespaceSelector != nil:
					labels = p.NamespaceSelector.MatchLabels
				}
				for k, v := range labels {
					if v != "ambient" {
						continue
					}
					if len(r.Ports) != 1 || r.Ports[0].Port == nil || r.Ports[0].Port.IntValue() != 15008 {
						t.Errorf("ambient %s %s reached on ports %+v, want 15008 alone", kind, k, r.Ports)
					}
					found[kind+" "+k] = true
				}
			}
		}
		return found
	}
	np := func(ambient bool) networkingv1.NetworkPolicy {
		return egressPolicy(t, map[string]any{
			"networkPolicy": map[string]any{"enabled": true, "namespaces": []any{"shop"}},
			"ambient":       map[string]any{"enabled": ambient},
		}, "shop")
	}
	got := hbone(np(true))
	for _, want := range []string{"namespace istio.io/dataplane-mode", "namespace trustmesh.io/dataplane-mode",
		"pod istio.io/dataplane-mode", "pod trustmesh.io/dataplane-mode"} {
		if !got[want] {
			t.Errorf("no egress to an ambient %s: %v", want, got)
		}
	}
	if got := hbone(np(false)); len(got) != 0 {
		t.Errorf("egress to ambient pods without the profile: %v", got)
	}
}
