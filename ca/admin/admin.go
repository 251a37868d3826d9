// Package admin is the CA's operator API: what `trustmesh ca` and
// `trustmesh audit` do, and what a newcomer looks for when asking "how do I
// rotate by hand, make a join token, revoke an identity, print the trust
// bundle or audit the journal?".
//
// Every operation works on a data directory (DataDir) and the journal that
// binds it to a trust domain (OpenJournal). The CA's own certificates are
// read and rotated where a serving control plane keeps them: the data
// directory's ca/ subdirectory, or the Kubernetes Secret named by
// JournalOptions.CASecret. An operation pointed at a place no control plane
// serves never creates a CA there (rotation.ErrNoCA).
//
// The package reaches only ca/* and the Kubernetes client; the control plane
// uses it to open the journal, and the CLI and the benchmarks call it.
package admin

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// The layout of a data directory.
const (
	caSubdir          = "ca"
	journalFile       = "journal.db"
	checkpointKeyFile = "checkpoint-key.pem"
	checkpointPubFile = "checkpoint.pub"
	metaTrustDomain   = "trust_domain"
)

// DataDir is a trustmesh data directory.
type DataDir string

// CADir holds self-managed CA material.
func (d DataDir) CADir() string { return filepath.Join(string(d), caSubdir) }

// JournalPath is the embedded journal database.
func (d DataDir) JournalPath() string { return filepath.Join(string(d), journalFile) }

// CheckpointPubPath holds the verifier key of the journal's checkpoints, for
// `trustmesh audit` and outsiders.
func (d DataDir) CheckpointPubPath() string { return filepath.Join(string(d), checkpointPubFile) }

// JournalOptions say where the journal and its checkpoint key live.
type JournalOptions struct {
	// DSN is a PostgreSQL URL; empty selects SQLite in the data directory.
	DSN string
	// CheckpointKeyURI names the Ed25519 checkpoint key in a KMS; empty
	// selects (and on first use creates) a key file in the data directory.
	CheckpointKeyURI string
	// CheckpointSecret ("namespace/name") keeps the checkpoint key in a
	// Kubernetes Secret, created on first use, so that replicas sharing a
	// journal sign with one key. Used when CheckpointKeyURI is empty.
	CheckpointSecret string
	// CASecret ("namespace/name") is where serve --ca-secret keeps the CA
	// and its rotation state; commands that read the CA (the trust bundle,
	// the rotation audit) read it there instead of the data directory.
	CASecret string
	// Kube reaches CheckpointSecret and CASecret; when nil, Kubeconfig (or
	// the pod's service account) is used.
	Kube       kubernetes.Interface
	Kubeconfig string
	// Witness receives every new checkpoint.
	Witness journal.Witness
	Log     *slog.Logger
}

// kube is o.Kube, or a client from o.Kubeconfig (or the pod's service
// account).
func (o JournalOptions) kube() (kubernetes.Interface, error) {
	if o.Kube != nil {
		return o.Kube, nil
	}
	var cfg *rest.Config
	var err error
	if o.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("admin: Kubernetes client configuration: %w", err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("admin: Kubernetes client: %w", err)
	}
	return client, nil
}
