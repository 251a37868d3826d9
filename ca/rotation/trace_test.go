package rotation_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestTickTracesEachStep: every step Tick takes is one ca.rotation.step
// span naming the step and its generation; a tick that takes no step makes
// no span.
func TestTickTracesEachStep(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(t0)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(ctx)
	cfg := suiteConfig(rotation.DirStore{Dir: t.TempDir()}, clk, &recorder{})
	cfg.TracerProvider = tp
	m, err := rotation.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Initial(ctx); err != nil {
		t.Fatal(err)
	}
	var want []string
	for d := time.Duration(0); d <= 160*time.Second; d += suite.Interval {
		clk.SetTime(t0.Add(d))
		a, err := m.Tick(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if a != rotation.Nothing {
			st, err := m.ReadState(ctx)
			if err != nil {
				t.Fatal(err)
			}
			gen := st.Active
			if a == rotation.PrepareIntermediate || a == rotation.PrepareRoot {
				gen = st.Next
			}
			want = append(want, fmt.Sprintf("%s@%d", a, gen))
		}
	}
	var got []string
	for _, s := range sr.Ended() {
		if s.Name() != "ca.rotation.step" || s.InstrumentationScope().Name != "trustmesh/ca" {
			t.Errorf("unexpected span %s from %s", s.Name(), s.InstrumentationScope().Name)
			continue
		}
		a := map[attribute.Key]attribute.Value{}
		for _, kv := range s.Attributes() {
			a[kv.Key] = kv.Value
		}
		got = append(got, fmt.Sprintf("%s@%d", a["rotation.step"].AsString(), a["rotation.generation"].AsInt64()))
	}
	if len(want) < 3 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("step spans\n got %v\nwant %v", got, want)
	}
}
