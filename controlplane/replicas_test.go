package controlplane_test

import (
	"context"
	"errors"
	"net/url"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/controlplane"
)

// TestReplicasShareTheCASecret runs two control planes against one real
// kube-apiserver: they serve the same CA from one Secret (their data
// directories hold no CA key), exactly one leads rotation, and a rotation
// made by one reaches the other.
func TestReplicasShareTheCASecret(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "trustmesh-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dsn := os.Getenv("TRUSTMESH_TEST_POSTGRES_DSN")
	var journalDSN string
	if dsn != "" {
		journalDSN = dsnWithDatabase(t, dsn)
	}
	replica := func() *env {
		return start(t, func(c *controlplane.Config) {
			c.Kubernetes.RestConfig = cfg
			c.Kubernetes.Mode = controlplane.KubernetesOn
			c.CA.Secret = "trustmesh-system/trustmesh-ca"
			c.Rotation.Manual = true
			c.Journal.DSN = journalDSN
		})
	}
	a := replica()
	b := replica()
	if !a.cp.Authority().Current().Anchor.Equal(b.cp.Authority().Current().Anchor) ||
		!a.cp.Authority().Current().Cert.Equal(b.cp.Authority().Current().Cert) {
		t.Fatal("the replicas serve different CAs")
	}
	if _, err := os.Stat(admin.DataDir(a.dataDir).CADir()); !os.IsNotExist(err) {
		t.Fatalf("a replica's data directory holds CA material (%v)", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for a.cp.IsLeader() == b.cp.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatalf("leaders: a=%v b=%v; want exactly one", a.cp.IsLeader(), b.cp.IsLeader())
		}
		time.Sleep(50 * time.Millisecond) // the lease is acquired on client-go's own clock
	}

	if err := a.cp.Rotation().Prepare(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := b.cp.Rotation().Reload(ctx, b.cp.Authority().Replace); err != nil {
		t.Fatal(err)
	}
	if got := len(b.cp.Authority().Current().Roots); got != 2 {
		t.Fatalf("the other replica's bundle has %d roots after a root was prepared; want 2", got)
	}
	// Both replicas issue under the same CA.
	c := newClient(t)
	b.obtain(c, b.token(vmID, time.Minute), vmID)

	// The commands that read the CA find it in the Secret, not in a
	// replica's data directory.
	o := admin.JournalOptions{DSN: journalDSN, CASecret: "trustmesh-system/trustmesh-ca", Kube: cs}
	bundle, err := admin.TrustBundle(ctx, admin.DataDir(b.dataDir), o, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := bundle.X509Authorities(); len(got) != 2 || !got[0].Equal(b.cp.Authority().Current().Roots[0]) && !got[1].Equal(b.cp.Authority().Current().Roots[0]) {
		t.Fatalf("ca bundle --ca-secret printed %d roots; want the 2 the replicas trust", len(got))
	}
	rep, err := admin.AuditRotation(ctx, admin.DataDir(b.dataDir), o, time.Now(), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]int{}
	for _, c := range rep.CA {
		states[c.Role+"/"+c.State]++
	}
	if states["root/active"] != 1 || states["root/prepared"] != 1 || states["intermediate/active"] != 1 {
		t.Fatalf("audit rotation --ca-secret reports the CA as %v; want the active root and intermediate and the prepared root", states)
	}
	// Without it, a replica's data directory holds no CA: the audit says so
	// rather than report on identities alone.
	o.CASecret = ""
	if _, err := admin.AuditRotation(ctx, admin.DataDir(b.dataDir), o, time.Now(), 24*time.Hour); !errors.Is(err, rotation.ErrNoCA) {
		t.Fatalf("audit rotation without the CA = %v; want ErrNoCA", err)
	}
	if _, err := admin.TrustBundle(ctx, admin.DataDir(b.dataDir), o, ""); !errors.Is(err, rotation.ErrNoCA) {
		t.Fatalf("ca bundle without the CA = %v; want ErrNoCA", err)
	}
	if _, err := os.Stat(admin.DataDir(b.dataDir).CADir()); !os.IsNotExist(err) {
		t.Fatalf("reading the CA from a replica's data directory created one there (%v)", err)
	}
}

// dsnWithDatabase creates a database of its own for a test on the server
// the test script started, and returns its DSN.
func dsnWithDatabase(t *testing.T, admin string) string {
	t.Helper()
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	name := "cp_" + time.Now().Format("150405") + "_" + randHex(4)
	db := openPostgres(t, admin)
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}
