package probe_test

import (
	"reflect"
	"testing"

	"github.com/trustmesh/trustmesh/api/probe"
)

func TestRoundTrip(t *testing.T) {
	svc := "health"
	in := probe.Probers{
		probe.Path("web", probe.Liveness):  {HTTPGet: &probe.HTTPGet{Path: "/livez", Port: 8080, Scheme: "HTTPS"}, TimeoutSeconds: 2},
		probe.Path("web", probe.Readiness): {TCPSocket: &probe.TCPSocket{Port: 8080}},
		probe.Path("rpc", probe.Startup):   {GRPC: &probe.GRPC{Port: 9090, Service: &svc}},
	}
	text, err := in.Encode()
	if err != nil {
		t.Fatal(err)
	}
	out, err := probe.Decode(text)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip changed the probers: %s", text)
	}
}

func TestDecodeRefuses(t *testing.T) {
	for name, text := range map[string]string{
		"not JSON":        `{`,
		"no handler":      `{"/app-health/a/livez":{}}`,
		"two handlers":    `{"/app-health/a/livez":{"httpGet":{"port":80},"tcpSocket":{"port":80}}}`,
		"port zero":       `{"/app-health/a/livez":{"tcpSocket":{"port":0}}}`,
		"port too large":  `{"/app-health/a/livez":{"grpc":{"port":65536}}}`,
		"null prober":     `{"/app-health/a/livez":null}`,
		"named port text": `{"/app-health/a/livez":{"httpGet":{"port":"http"}}}`,
	} {
		if _, err := probe.Decode(text); err == nil {
			t.Errorf("%s: accepted %s", name, text)
		}
	}
}
