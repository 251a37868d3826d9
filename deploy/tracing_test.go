package deploy_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
)

// serveContainer renders the chart with values and returns the container
// that runs trustmesh serve.
func serveContainer(t *testing.T, values map[string]any) corev1.Container {
	t.Helper()
	objs, err := deploy.Render(deploy.RenderOptions{Values: values})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		var dep appsv1.Deployment
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &dep); err != nil {
			t.Fatal(err)
		}
		for _, c := range dep.Spec.Template.Spec.Containers {
			if len(c.Args) > 0 && c.Args[0] == "serve" {
				return c
			}
		}
	}
	t.Fatal("no Deployment runs trustmesh serve")
	return corev1.Container{}
}

func tracingArgs(c corev1.Container) []string {
	var out []string
	for _, a := range c.Args {
		if strings.HasPrefix(a, "--tracing-") {
			out = append(out, a)
		}
	}
	return out
}

func otelEnv(c corev1.Container) map[string]string {
	out := map[string]string{}
	for _, e := range c.Env {
		if strings.HasPrefix(e.Name, "OTEL_") {
			out[e.Name] = e.Value
		}
	}
	return out
}

// TestTracingOffByDefault: by default the proxies get no tracer and the
// control plane no OpenTelemetry variables, so tracing is off.
func TestTracingOffByDefault(t *testing.T) {
	c := serveContainer(t, nil)
	if got := tracingArgs(c); len(got) != 0 {
		t.Errorf("serve gets %v by default, want no tracing flag", got)
	}
	if got := otelEnv(c); len(got) != 0 {
		t.Errorf("serve gets %v by default, want no OTEL_ variable", got)
	}
}

// TestTracingValues: tracing.collector and samplingPercent become serve's
// --tracing-collector and --tracing-sampling; tracing.otel becomes the
// container's environment.
func TestTracingValues(t *testing.T) {
	c := serveContainer(t, map[string]any{"tracing": map[string]any{
		"collector":       "otel-collector.observability:4317",
		"samplingPercent": 2.5,
		"otel": map[string]any{
			"OTEL_TRACES_EXPORTER":        "otlp",
			"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
			"OTEL_TRACES_SAMPLER_ARG":     "0.01",
		},
	}})
	if got, want := tracingArgs(c), []string{"--tracing-collector=otel-collector.observability:4317", "--tracing-sampling=2.5"}; !slices.Equal(got, want) {
		t.Errorf("tracing flags %v, want %v", got, want)
	}
	want := map[string]string{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
	got := otelEnv(c)
	if len(got) != len(want) {
		t.Fatalf("OTEL_ variables %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
}

// TestTracingValuesRefused: the schema refuses a collector that is not
// host:port, a sampling percent outside 0..100 and a variable that is not
// an OpenTelemetry one (tracing.otel must not set PATH or GOMEMLIMIT).
func TestTracingValuesRefused(t *testing.T) {
	for name, tracing := range map[string]map[string]any{
		"collector without a port": {"collector": "otel-collector.observability"},
		"collector as a URL":       {"collector": "http://otel-collector:4317"},
		"sampling over 100":        {"samplingPercent": 150},
		"negative sampling":        {"samplingPercent": -1},
		"not an OTEL_ variable":    {"otel": map[string]any{"PATH": "/tmp"}},
		"a variable not a string":  {"otel": map[string]any{"OTEL_BSP_SCHEDULE_DELAY": 100}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"tracing": tracing}})
			if !errors.Is(err, deploy.ErrInvalidValues) {
				t.Fatalf("error %v, want ErrInvalidValues", err)
			}
		})
	}
}
