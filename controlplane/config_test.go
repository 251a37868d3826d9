package controlplane_test

import (
	"slices"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// groups lists the Config groups that err names, in order, each once.
func groups(err error) []string {
	var out []string
	var walk func(error)
	walk = func(err error) {
		switch u := err.(type) {
		case *controlplane.ConfigError:
			out = append(out, u.Group)
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		}
	}
	walk(err)
	return slices.Compact(out)
}

func TestValidateReportsEveryGroupAtFault(t *testing.T) {
	off := controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff}
	witnessKey := newWitnessKey(t)
	for _, tc := range []struct {
		name string
		cfg  controlplane.Config
		want []string
	}{
		{"defaults", controlplane.Config{Kubernetes: off}, nil},
		{"trust domain", controlplane.Config{TrustDomain: "Not A Domain", Kubernetes: off}, []string{"TrustDomain"}},
		{"kubernetes mode", controlplane.Config{Kubernetes: controlplane.KubernetesConfig{Mode: "sometimes"}}, []string{"Kubernetes"}},
		{"listen address", controlplane.Config{Kubernetes: off, Listen: controlplane.ListenConfig{CA: "no-port"}}, []string{"Listen"}},
		{"connection cap", controlplane.Config{Kubernetes: off, Listen: controlplane.ListenConfig{Connections: connlimit.Config{MaxConnections: -1}}}, []string{"Listen"}},
		{"workload TTLs", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{MinWorkloadTTL: time.Hour, MaxWorkloadTTL: time.Minute}}, []string{"CA"}},
		{"workload TTL under twice the backdate", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{MinWorkloadTTL: 59 * time.Second}}, []string{"CA"}},
		{"workload TTL twice the backdate", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{MinWorkloadTTL: time.Minute}}, nil},
		{"workload TTL twice a shorter backdate", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{MinWorkloadTTL: 10 * time.Second, WorkloadBackdate: 5 * time.Second}}, nil},
		{"CA secret off Kubernetes", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{Secret: "ns/name"}}, []string{"CA"}},
		{"control-plane ID elsewhere", controlplane.Config{Kubernetes: off, CA: controlplane.CAConfig{ControlPlaneID: "spiffe://other.example/cp"}}, []string{"CA"}},
		{"shared journal, own keys", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{DSN: "postgres://db"}}, []string{"Journal"}},
		{"witness of another scheme", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "ftp://witness.example/c"}}, []string{"Journal"}},
		{"witness URL in capitals", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "HTTPS://witness.example/c", WitnessKey: witnessKey}}, nil},
		{"witness URL without its key", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "https://witness.example/c"}}, []string{"Journal"}},
		{"witness file, no key", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "/var/lib/witness/checkpoint"}}, nil},
		{"witness key without a URL", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "/var/lib/witness/checkpoint", WitnessKey: witnessKey}}, []string{"Journal"}},
		{"witness key that is not cosignature/v1", controlplane.Config{Kubernetes: off, Journal: controlplane.JournalConfig{Witness: "https://witness.example/c", WitnessKey: "log.example+01234567+AQ=="}}, []string{"Journal"}},
		{"rotation cuts certificates short", controlplane.Config{Kubernetes: off, Rotation: controlplane.RotationConfig{IntermediateTTL: 12 * time.Hour}}, []string{"Rotation"}},
		{"rotation fast enough", controlplane.Config{Kubernetes: off,
			CA:       controlplane.CAConfig{MinWorkloadTTL: 20 * time.Second, DefaultWorkloadTTL: 20 * time.Second, MaxWorkloadTTL: 20 * time.Second, WorkloadBackdate: 5 * time.Second},
			Rotation: controlplane.RotationConfig{IntermediateTTL: time.Minute, RootTTL: 5 * time.Minute, RootPropagation: 10 * time.Second, Backdate: 5 * time.Second, Interval: time.Second},
		}, nil},
		{"redaction pattern", controlplane.Config{Kubernetes: off, Authz: controlplane.AuthzConfig{LogRedactPaths: []string{"("}}}, []string{"Authz"}},
		{"tracing collector", controlplane.Config{Kubernetes: off, XDS: controlplane.XDSConfig{Tracing: controlplane.TracingConfig{Collector: "collector"}}}, []string{"XDS"}},
		{"tracing sampling", controlplane.Config{Kubernetes: off, XDS: controlplane.XDSConfig{Tracing: controlplane.TracingConfig{Collector: "collector:4317", SamplingPercent: 150}}}, []string{"XDS"}},
		{"tracing", controlplane.Config{Kubernetes: off, XDS: controlplane.XDSConfig{Tracing: controlplane.TracingConfig{Collector: "otel.observability:4317", SamplingPercent: 1}}}, nil},
		{"three groups", controlplane.Config{
			Kubernetes: off,
			Listen:     controlplane.ListenConfig{Monitoring: "no-port"},
			CA:         controlplane.CAConfig{KeyURI: "kms://key"},
			Authz:      controlplane.AuthzConfig{LogRedactPaths: []string{"("}},
		}, []string{"Listen", "CA", "Authz"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if got := groups(err); !slices.Equal(got, tc.want) {
				t.Fatalf("Validate reports groups %q, want %q (%v)", got, tc.want, err)
			}
		})
	}
}
