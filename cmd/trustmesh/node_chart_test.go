package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
)

// TestChartRunsTrustmeshNodeAsItParses: the arguments the chart's ambient
// profile gives trustmesh node are ones it accepts (trustmesh node
// --validate), with the pod's files in place: the downward API's node
// name, the mounted bundle and token.
func TestChartRunsTrustmeshNodeAsItParses(t *testing.T) {
	objs, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"ambient": map[string]any{"enabled": true}}})
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" && o.GetName() == "trustmesh-node" {
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ds.Name == "" {
		t.Fatal("no DaemonSet trustmesh-node")
	}
	c := ds.Spec.Template.Spec.Containers[0]

	// The pod's mounts, under a temporary directory.
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, m := range c.VolumeMounts {
		for _, v := range ds.Spec.Template.Spec.Volumes {
			switch {
			case v.Name != m.Name:
			case v.ConfigMap != nil:
				files[m.MountPath+"/root-cert.pem"] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
			case v.Projected != nil:
				for _, s := range v.Projected.Sources {
					files[m.MountPath+"/"+s.ServiceAccountToken.Path] = []byte("a.projected.token")
				}
			}
		}
	}
	args := []string{}
	for _, a := range c.Args {
		a = strings.ReplaceAll(a, "$(NODE_NAME)", "node-a")
		a = strings.ReplaceAll(a, "$(NODE_IP)", "10.0.0.7") // status.hostIP
		if flag, val, ok := strings.Cut(a, "="); ok && strings.HasPrefix(val, "/") {
			local := filepath.Join(dir, filepath.FromSlash(val))
			if data, ok := files[val]; ok {
				if err := os.MkdirAll(filepath.Dir(local), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(local, data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			a = flag + "=" + local
		}
		args = append(args, a)
	}
	if len(files) != 2 {
		t.Fatalf("mounted files %v, want the bundle and the token", files)
	}
	if out := run(t, append(args, "--validate")...); !strings.Contains(out, "configuration is valid") {
		t.Errorf("trustmesh %s --validate: %s", strings.Join(args, " "), out)
	}
}
