package admin

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// OpenJournal opens the journal and binds it to a trust domain: the first
// start records the trust domain, and every later use must agree. An empty
// td accepts the recorded one. readOnly opens it without the checkpoint key,
// for audits.
func (d DataDir) OpenJournal(ctx context.Context, td string, o JournalOptions, readOnly bool) (*journal.Store, spiffeid.TrustDomain, error) {
	return d.openJournal(ctx, td, o, readOnly, false)
}

// ErrNoDataDir is returned when an operator command is pointed at a data
// directory, or a journal, that no trustmesh serve has created.
var ErrNoDataDir = errors.New("no trustmesh data directory")

// openExisting opens the journal of a data directory that trustmesh serve
// has set up, for an operator command. It creates nothing: not the
// directory, not the journal, not the checkpoint key.
func (d DataDir) openExisting(ctx context.Context, o JournalOptions, readOnly bool) (*journal.Store, spiffeid.TrustDomain, error) {
	return d.openJournal(ctx, "", o, readOnly, true)
}

// notSetUp says that d is not a data directory trustmesh serve set up, and
// how to make one.
func (d DataDir) notSetUp(why string) error {
	return fmt.Errorf("admin: %w at %s (%s; start `trustmesh serve --data-dir %s` first)", ErrNoDataDir, d, why, d)
}

func (d DataDir) openJournal(ctx context.Context, td string, o JournalOptions, readOnly, existing bool) (*journal.Store, spiffeid.TrustDomain, error) {
	// Reading a shared journal (PostgreSQL) needs no data directory: the
	// CA may live in a Secret. Everything else keeps state in it.
	if existing && (o.DSN == "" || !readOnly) {
		fi, err := os.Stat(string(d))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil, spiffeid.TrustDomain{}, d.notSetUp("it does not exist")
		case err != nil:
			return nil, spiffeid.TrustDomain{}, fmt.Errorf("admin: data directory: %w", err)
		case !fi.IsDir():
			return nil, spiffeid.TrustDomain{}, d.notSetUp("it is not a directory")
		}
	}
	dsn := o.DSN
	if dsn == "" {
		dsn = d.JournalPath()
		if err := d.journalLost(); err != nil {
			return nil, spiffeid.TrustDomain{}, err
		}
		if _, err := os.Stat(dsn); (existing || readOnly) && errors.Is(err, fs.ErrNotExist) {
			return nil, spiffeid.TrustDomain{}, d.notSetUp("it has no journal.db")
		}
	}
	cfg := journal.Config{DSN: dsn, Existing: existing, Witness: o.Witness, Log: o.Log}
	store, err := journal.Open(ctx, cfg)
	if err != nil {
		return nil, spiffeid.TrustDomain{}, err
	}
	var stored string
	if td == "" {
		stored, err = store.Meta(ctx, metaTrustDomain)
		if errors.Is(err, journal.ErrNotFound) {
			err = d.notSetUp("its journal has no trust domain yet")
		}
	} else {
		stored, err = store.SetMetaOnce(ctx, metaTrustDomain, td)
		if err == nil && stored != td {
			err = fmt.Errorf("admin: the journal belongs to trust domain %q, not %q", stored, td)
		}
	}
	var parsed spiffeid.TrustDomain
	if err == nil {
		if parsed, err = spiffeid.TrustDomainFromString(stored); err != nil {
			err = fmt.Errorf("admin: trust domain %q: %w", stored, err)
		}
	}
	if err == nil && !readOnly {
		err = d.attachSigner(ctx, store, parsed, o, existing)
	}
	if err == nil && !readOnly {
		if err = store.Integrity(); err != nil {
			err = fmt.Errorf("admin: refusing to append to the journal: %w; run trustmesh audit verify", err)
		}
	}
	if err != nil {
		store.Close()
		return nil, spiffeid.TrustDomain{}, err
	}
	return store, parsed, nil
}

// JournalOrigin names a trust domain's journal in its checkpoints.
func JournalOrigin(td spiffeid.TrustDomain) string { return "trustmesh.journal/" + td.Name() }

// attachSigner loads (or on first use creates) the checkpoint key, which is
// separate from the CA key, and publishes its verifier key.
// With existing, the key must be there already.
func (d DataDir) attachSigner(ctx context.Context, store *journal.Store, td spiffeid.TrustDomain, o JournalOptions, existing bool) error {
	uri := o.CheckpointKeyURI
	var key crypto.Signer
	var err error
	switch {
	case uri != "":
		key, err = authority.OpenSigner(ctx, uri)
	case o.CheckpointSecret != "":
		key, err = checkpointKeyFromSecret(ctx, store, o, existing)
	default:
		key, err = d.checkpointKeyFile(ctx, store, existing)
	}
	if err != nil {
		return err
	}
	signer, vkey, err := journal.NewCheckpointSigner(JournalOrigin(td), key)
	if err != nil {
		return err
	}
	pub := []byte(vkey + "\n")
	if old, err := os.ReadFile(d.CheckpointPubPath()); err != nil || !bytes.Equal(old, pub) {
		if err := atomicfile.WriteFile(d.CheckpointPubPath(), pub, 0o644); err != nil {
			return fmt.Errorf("admin: %w", err)
		}
	}
	return store.SetSigner(ctx, signer, vkey)
}

// journalLost refuses an SQLite journal that is missing, or empty, in a
// data directory whose CA already exists: serve creates the journal before
// the CA and the checkpoint key, so the journal of such a directory holds
// the CA's history, and a new, empty one would silently drop it.
func (d DataDir) journalLost() error {
	var why string
	switch fi, err := os.Stat(d.JournalPath()); {
	case errors.Is(err, fs.ErrNotExist):
		why = "is missing"
	case err != nil:
		return fmt.Errorf("admin: journal: %w", err)
	case fi.Size() > 0:
		return nil
	default:
		// SQLite opens an empty file as a new database (and discards a
		// write-ahead log beside it), so an empty journal.db is a lost one.
		why = "is empty"
	}
	var evidence string
	for _, p := range []string{filepath.Join(d.CADir(), "rotation.json"), filepath.Join(string(d), checkpointKeyFile)} {
		if _, err := os.Stat(p); err == nil {
			evidence = p
			break
		}
	}
	if evidence == "" {
		gens, _ := filepath.Glob(filepath.Join(d.CADir(), "gen-*"))
		if len(gens) == 0 {
			return nil // a first start: the journal is created
		}
		evidence = gens[0]
	}
	return fmt.Errorf("admin: journal %s %s, but this data directory already holds a CA (%s exists), whose history is in that journal; restore journal.db from a backup (trustmesh does not start a new journal under an existing CA)", d.JournalPath(), why, evidence)
}

// checkpointHistory returns how many entries the journal holds and the size
// of its latest signed checkpoint (0 when none).
func checkpointHistory(ctx context.Context, store *journal.Store) (entries, signed uint64, err error) {
	if entries, err = store.Size(ctx); err != nil {
		return 0, 0, err
	}
	cp, err := store.LatestCheckpoint(ctx)
	switch {
	case errors.Is(err, journal.ErrNotFound):
		return entries, 0, nil
	case err != nil:
		return 0, 0, err
	}
	return entries, cp.Size, nil
}

// refuseNewCheckpointKey refuses to create a checkpoint key for a journal
// that already holds entries: the checkpoints that vouch for them were
// signed by the lost key, and a new one cannot sign that history.
func refuseNewCheckpointKey(ctx context.Context, store *journal.Store, where string) error {
	entries, signed, err := checkpointHistory(ctx, store)
	if err != nil {
		return fmt.Errorf("admin: checkpoint key: %w", err)
	}
	if entries == 0 && signed == 0 {
		return nil
	}
	return fmt.Errorf("admin: checkpoint key %s is missing, but the journal already holds %d entries (latest signed checkpoint: size %d); restore the key from a backup (a new key cannot sign this history)", where, entries, signed)
}

// checkpointKeyFile loads, or on first use (unless existing) creates, the
// checkpoint key file in the data directory. It never creates one for a
// journal that already has entries.
func (d DataDir) checkpointKeyFile(ctx context.Context, store *journal.Store, existing bool) (crypto.Signer, error) {
	path := filepath.Join(string(d), checkpointKeyFile)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		if existing {
			return nil, d.notSetUp("it has no " + checkpointKeyFile)
		}
		if err := refuseNewCheckpointKey(ctx, store, path); err != nil {
			return nil, err
		}
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("admin: checkpoint key: %w", err)
		}
		if err := authority.WriteKeyFile(path, key); err != nil {
			return nil, err
		}
	}
	uri, err := authority.SoftKMSURI(path)
	if err != nil {
		return nil, err
	}
	return authority.OpenSigner(ctx, uri)
}

// checkpointKeyFromSecret loads the checkpoint key from a Kubernetes Secret,
// creating it exactly once when replicas start together, and never for a
// journal that already has entries.
func checkpointKeyFromSecret(ctx context.Context, store *journal.Store, o JournalOptions, existing bool) (crypto.Signer, error) {
	ns, name, ok := strings.Cut(o.CheckpointSecret, "/")
	if !ok {
		return nil, fmt.Errorf("admin: checkpoint secret %q is not namespace/name", o.CheckpointSecret)
	}
	client, err := o.kube()
	if err != nil {
		return nil, err
	}
	const dataKey = "checkpoint-key.pem"
	for attempt := 0; attempt < 3; attempt++ {
		sec, err := client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			return authority.SignerFromPEM(ctx, sec.Data[dataKey])
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("admin: checkpoint secret %s: %w", o.CheckpointSecret, err)
		}
		if existing {
			return nil, fmt.Errorf("admin: checkpoint secret %s does not exist; start trustmesh serve with --checkpoint-secret %s first", o.CheckpointSecret, o.CheckpointSecret)
		}
		if err := refuseNewCheckpointKey(ctx, store, "secret "+o.CheckpointSecret); err != nil {
			return nil, err
		}
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("admin: checkpoint key: %w", err)
		}
		keyPEM, err := authority.EncodeKey(key)
		if err != nil {
			return nil, err
		}
		_, err = client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
				Labels: map[string]string{"app.kubernetes.io/part-of": "trustmesh", "app.kubernetes.io/component": "journal"}},
			Type: corev1.SecretTypeOpaque,
			Data: map[string][]byte{dataKey: keyPEM},
		}, metav1.CreateOptions{})
		if err == nil {
			return key, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("admin: create checkpoint secret %s: %w", o.CheckpointSecret, err)
		}
	}
	return nil, fmt.Errorf("admin: checkpoint secret %s kept changing", o.CheckpointSecret)
}
