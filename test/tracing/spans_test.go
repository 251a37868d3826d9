package tracing

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// span is one span as the collector's file exporter wrote it (OTLP JSON:
// ids in hex, 64-bit integers as strings).
type span struct {
	Service      string // the resource's service.name
	Scope        string // the tracer's name
	TraceID      string
	SpanID       string
	ParentSpanID string
	Name         string
	Kind         int
	Attrs        map[string]any // string, int64, float64, bool or []any
}

type otlpValue struct {
	StringValue *string          `json:"stringValue"`
	IntValue    *json.RawMessage `json:"intValue"`
	DoubleValue *float64         `json:"doubleValue"`
	BoolValue   *bool            `json:"boolValue"`
	ArrayValue  *struct {
		Values []otlpValue `json:"values"`
	} `json:"arrayValue"`
}

type otlpKV struct {
	Key   string    `json:"key"`
	Value otlpValue `json:"value"`
}

type otlpFile struct {
	ResourceSpans []struct {
		Resource struct {
			Attributes []otlpKV `json:"attributes"`
		} `json:"resource"`
		ScopeSpans []struct {
			Scope struct {
				Name string `json:"name"`
			} `json:"scope"`
			Spans []struct {
				TraceID      string   `json:"traceId"`
				SpanID       string   `json:"spanId"`
				ParentSpanID string   `json:"parentSpanId"`
				Name         string   `json:"name"`
				Kind         int      `json:"kind"`
				Attributes   []otlpKV `json:"attributes"`
			} `json:"spans"`
		} `json:"scopeSpans"`
	} `json:"resourceSpans"`
}

func (v otlpValue) value() (any, error) {
	switch {
	case v.StringValue != nil:
		return *v.StringValue, nil
	case v.IntValue != nil:
		// The OTLP JSON encoding writes 64-bit integers as strings.
		s := strings.Trim(string(*v.IntValue), `"`)
		return strconv.ParseInt(s, 10, 64)
	case v.DoubleValue != nil:
		return *v.DoubleValue, nil
	case v.BoolValue != nil:
		return *v.BoolValue, nil
	case v.ArrayValue != nil:
		var out []any
		for _, e := range v.ArrayValue.Values {
			x, err := e.value()
			if err != nil {
				return nil, err
			}
			out = append(out, x)
		}
		return out, nil
	}
	return nil, nil
}

func attrs(kvs []otlpKV) (map[string]any, error) {
	out := map[string]any{}
	for _, kv := range kvs {
		v, err := kv.Value.value()
		if err != nil {
			return nil, fmt.Errorf("attribute %s: %w", kv.Key, err)
		}
		out[kv.Key] = v
	}
	return out, nil
}

// readSpans parses every span in the collector's file.
func readSpans(path string) ([]span, error) {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []span
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var f otlpFile
		if err := json.Unmarshal(line, &f); err != nil {
			// The exporter may be writing the last line right now.
			continue
		}
		for _, rs := range f.ResourceSpans {
			res, err := attrs(rs.Resource.Attributes)
			if err != nil {
				return nil, err
			}
			service, _ := res["service.name"].(string)
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					a, err := attrs(s.Attributes)
					if err != nil {
						return nil, fmt.Errorf("span %s: %w", s.Name, err)
					}
					out = append(out, span{Service: service, Scope: ss.Scope.Name, TraceID: s.TraceID, SpanID: s.SpanID,
						ParentSpanID: s.ParentSpanID, Name: s.Name, Kind: s.Kind, Attrs: a})
				}
			}
		}
	}
	return out, sc.Err()
}

// waitSpans polls the collector's file until done reports that the spans
// it needs have arrived, and returns them all.
func waitSpans(t *testing.T, c *otelcol, what string, done func([]span) bool) []span {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		spans, err := readSpans(c.file)
		if err != nil {
			t.Fatal(err)
		}
		if done(spans) {
			return spans
		}
		if time.Now().After(deadline) {
			var names []string
			for _, s := range spans {
				names = append(names, fmt.Sprintf("%s(trace %s span %s parent %s)", s.Name, s.TraceID, s.SpanID, s.ParentSpanID))
			}
			t.Fatalf("%s: %v; the collector has %d spans: %s\ncollector log:\n%s", what, errTimeout, len(spans), strings.Join(names, ", "), c.lastLog())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// inTrace returns the spans of one trace.
func inTrace(spans []span, traceID string) []span {
	var out []span
	for _, s := range spans {
		if s.TraceID == traceID {
			out = append(out, s)
		}
	}
	return out
}

// named returns the spans called name.
func named(spans []span, name string) []span {
	var out []span
	for _, s := range spans {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

// only returns the one span called name, failing the test if there is not
// exactly one.
func only(t *testing.T, spans []span, name string) span {
	t.Helper()
	got := named(spans, name)
	if len(got) != 1 {
		t.Fatalf("%d spans named %s, want 1: %+v", len(got), name, got)
	}
	return got[0]
}

// wantAttr fails the test unless s has attribute key with value want.
func wantAttr(t *testing.T, s span, key string, want any) {
	t.Helper()
	got, ok := s.Attrs[key]
	if !ok {
		t.Fatalf("span %s has no attribute %s; it has %v", s.Name, key, s.Attrs)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("span %s: %s = %v (%T), want %v", s.Name, key, got, got, want)
	}
}

// noAttr fails the test if s has attribute key.
func noAttr(t *testing.T, s span, key string) {
	t.Helper()
	if v, ok := s.Attrs[key]; ok {
		t.Fatalf("span %s has attribute %s = %v, want none", s.Name, key, v)
	}
}
