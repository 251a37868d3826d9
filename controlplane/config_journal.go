package controlplane

import (
	"errors"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// JournalConfig configures the issuance journal.
type JournalConfig struct {
	// DSN selects PostgreSQL for the journal and join tokens, which
	// replicas must share; empty keeps them in SQLite in DataDir.
	DSN string
	// CheckpointKeyURI names the journal's Ed25519 checkpoint key in a KMS;
	// empty keeps it in DataDir. It is never the CA key.
	CheckpointKeyURI string
	// Witness, a file outside DataDir or an http(s) URL, receives every
	// signed checkpoint.
	Witness string
	// WitnessKey is the cosignature/v1 verifier key of a tlog-witness at
	// Witness: its cosignatures are verified with it and kept in DataDir.
	WitnessKey string
}

// check checks the journal group against where the CA keeps its material:
// replicas that share a journal must share its key and the CA's.
func (c *JournalConfig) check(ca CAConfig) []error {
	var errs []error
	if c.DSN != "" && c.CheckpointKeyURI == "" && ca.Secret == "" {
		errs = append(errs, setting("journal-dsn", errors.New("replicas sharing a journal must share its checkpoint key: give --checkpoint-key-uri, or --ca-secret to keep it in a Secret")))
	}
	if c.DSN != "" && ca.CertsDir == "" && ca.Secret == "" {
		errs = append(errs, setting("journal-dsn", errors.New("with a shared journal (replicas), the CA keys must live in a Kubernetes Secret (--ca-secret) or come from --cacerts (with --ca-key-uri for a KMS), never in a replica's own data directory")))
	}
	errs = append(errs, setting("witness", journal.CheckTarget(c.Witness)))
	switch _, _, _, kerr := journal.ParseCosignatureKey(c.WitnessKey); {
	case journal.IsURL(c.Witness) && c.WitnessKey == "":
		errs = append(errs, setting("witness-key", errors.New("a --witness URL is a tlog-witness: give its cosignature/v1 verifier key (the witness's vkey), or its cosignatures cannot be verified")))
	case c.WitnessKey != "" && !journal.IsURL(c.Witness):
		errs = append(errs, setting("witness-key", errors.New("a witness key needs --witness to be the http(s) URL of a tlog-witness")))
	case c.WitnessKey != "" && kerr != nil:
		errs = append(errs, setting("witness-key", kerr))
	}
	return errs
}
