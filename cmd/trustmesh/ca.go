package main

import (
	"encoding/pem"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/human"
)

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Operate the CA in a data directory: join tokens, revocation, the trust bundle",
	}
	token := &cobra.Command{Use: "token", Short: "Manage one-time join tokens"}
	token.AddCommand(newTokenCreateCmd())
	cmd.AddCommand(token, newRevokeCmd(), newBundleCmd(), newRotateCmd())
	return cmd
}

func newTokenCreateCmd() *cobra.Command {
	var dataDir, id, node string
	var jo admin.JournalOptions
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a one-time join token bound to a SPIFFE ID, or to a node's identity; prints only the token",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var tok string
			var err error
			if node != "" {
				tok, err = admin.CreateNodeJoinToken(cmd.Context(), admin.DataDir(dataDir), jo, node, ttl)
			} else {
				tok, err = admin.CreateJoinToken(cmd.Context(), admin.DataDir(dataDir), jo, id, ttl)
			}
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok)
			return err
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&id, "spiffe-id", "", "SPIFFE ID the token enrols (this or --node is required)")
	cmd.Flags().StringVar(&node, "node", "", "enrol the node agent (trustmesh node) of node NAME: the token's SPIFFE ID is spiffe://TD/node/NAME")
	cmd.Flags().DurationVar(&ttl, "ttl", 10*time.Minute, "how long the token may wait to be used")
	cmd.MarkFlagsOneRequired("spiffe-id", "node")
	cmd.MarkFlagsMutuallyExclusive("spiffe-id", "node")
	return cmd
}

func newRevokeCmd() *cobra.Command {
	var dataDir, id string
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "revoke",
		Short: "Revoke a join-token identity's enrolments so it can no longer renew",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rev, err := admin.Revoke(cmd.Context(), admin.DataDir(dataDir), jo, id)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "revoked %s: %d enrolment(s), %d unused token(s)\n", id, rev.Enrolments, rev.Tokens)
			return err
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&id, "spiffe-id", "", "SPIFFE ID to revoke (required)")
	_ = cmd.MarkFlagRequired("spiffe-id")
	return cmd
}

func newBundleCmd() *cobra.Command {
	var dataDir, cacerts, format string
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "Print the trust bundle, as PEM or as a SPIFFE bundle (JWKS)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b, err := admin.TrustBundle(cmd.Context(), admin.DataDir(dataDir), jo, cacerts)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			switch format {
			case "pem":
				for _, c := range b.X509Authorities() {
					if err := pem.Encode(out, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
						return err
					}
				}
				return nil
			case "spiffe":
				doc, err := b.Marshal()
				if err != nil {
					return err
				}
				_, err = fmt.Fprintln(out, string(doc))
				return err
			}
			return &exitError{code: 2, err: fmt.Errorf("format %q is not pem or spiffe", format)}
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&cacerts, "cacerts", "", "operator-supplied CA directory, when serve uses --cacerts")
	cmd.Flags().StringVar(&format, "format", "pem", "pem or spiffe")
	addCASecretFlag(cmd, &jo)
	return cmd
}

// addDataFlags adds the flags that locate a CA's data directory and journal.
func addDataFlags(cmd *cobra.Command, dataDir *string, jo *admin.JournalOptions) {
	cmd.Flags().StringVar(dataDir, "data-dir", controlplane.DefaultDataDir, "the CA's data directory")
	cmd.Flags().StringVar(&jo.DSN, "journal-dsn", "", "PostgreSQL URL of the shared journal (default: SQLite in the data directory)")
	cmd.Flags().StringVar(&jo.CheckpointKeyURI, "checkpoint-key-uri", "", "KMS URI of the journal's checkpoint key (default: a key file in the data directory)")
	cmd.Flags().StringVar(&jo.CheckpointSecret, "checkpoint-secret", "", "namespace/name of the Secret holding the checkpoint key (replicas with --ca-secret use NAME-checkpoint)")
	cmd.Flags().StringVar(&jo.Kubeconfig, "kubeconfig", "", "kubeconfig for --checkpoint-secret and --ca-secret; in a cluster the pod's service account is used")
}

// addCASecretFlag adds --ca-secret to the commands that read the CA.
func addCASecretFlag(cmd *cobra.Command, jo *admin.JournalOptions) {
	cmd.Flags().StringVar(&jo.CASecret, "ca-secret", "", "namespace/name of the Secret that serve --ca-secret keeps the CA in (default: the data directory)")
}

func newRotateCmd() *cobra.Command {
	var dataDir string
	var jo admin.JournalOptions
	var prepare, activate, status, root, force bool
	var cacerts, keyURI, caSecret, taint string
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate the CA's certificates by hand: --prepare [--root], then --activate; --taint after a compromise; --status shows the state",
		Long: `Rotate self-managed CA certificates with overlap. --prepare creates the next
intermediate (with --root, a new root and an intermediate under it; the new
root enters the trust bundle at once). --activate makes it sign; a replaced
root stays in the bundle until everything signed under it has expired. A
running trustmesh serve picks the change up at its next rotation check.

--taint (intermediate, the default, or root) marks the active intermediate or
root as compromised after a key leak: a replacement is activated at once
(a new root without waiting for its propagation), every agent renews under
it as soon as the bundle it follows marks the old one tainted, and the
tainted authority leaves the bundle once the journal shows that no leaf
signed under it is still valid. Each step is journalled.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			step := ""
			steps := map[string]bool{"prepare": prepare, "activate": activate, "status": status, "taint": cmd.Flags().Changed("taint")}
			for name, on := range steps {
				if on {
					if step != "" {
						return &exitError{code: 2, err: fmt.Errorf("give one of --prepare, --activate, --taint and --status")}
					}
					step = name
				}
			}
			if step == "" {
				return &exitError{code: 2, err: fmt.Errorf("give one of --prepare, --activate, --taint and --status")}
			}
			st, err := admin.Rotate(cmd.Context(), admin.DataDir(dataDir), jo, admin.RotateRequest{
				Step: step, Root: root, CACertsDir: cacerts, KeyURI: keyURI, Force: force, CASecret: caSecret, Kubeconfig: jo.Kubeconfig,
				Taint: taint,
			})
			if err != nil {
				return err
			}
			return output.print(cmd.OutOrStdout(), st, func(w io.Writer) error { return printRotationStatus(w, st) })
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().BoolVar(&prepare, "prepare", false, "prepare the next CA")
	cmd.Flags().BoolVar(&root, "root", false, "with --prepare: rotate the root too")
	cmd.Flags().StringVar(&cacerts, "cacerts", "", "with --prepare: stage this operator-supplied CA directory (Istio's cacerts layout)")
	cmd.Flags().StringVar(&keyURI, "ca-key-uri", "", "with --cacerts: KMS URI of its signing key, instead of its ca-key.pem")
	cmd.Flags().BoolVar(&activate, "activate", false, "activate the prepared CA")
	cmd.Flags().BoolVar(&status, "status", false, "show the rotation state")
	cmd.Flags().BoolVar(&force, "force", false, "with --activate: activate a new root before its propagation time")
	cmd.Flags().StringVar(&taint, "taint", "", "mark the active intermediate or root as compromised and activate a replacement at once: intermediate or root")
	cmd.Flags().Lookup("taint").NoOptDefVal = "intermediate"
	cmd.Flags().StringVar(&caSecret, "ca-secret", "", "namespace/name of the Secret that serve --ca-secret keeps the CA in")
	addOutputFlag(cmd, &output)
	return cmd
}

func printRotationStatus(w io.Writer, st *admin.RotationStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "rotation state at %s\n\n", human.Time(st.At))
	if st.ActivatedAt.IsZero() {
		fmt.Fprintf(tw, "active generation\t%d\n", st.Active)
	} else {
		fmt.Fprintf(tw, "active generation\t%d\tactivated %s\n", st.Active, human.When(st.ActivatedAt, st.At))
	}
	switch {
	case st.Next == 0:
		fmt.Fprintf(tw, "prepared generation\tnone\n")
	case st.NextIsRoot:
		fmt.Fprintf(tw, "prepared generation\t%d (new root)\tprepared %s\n", st.Next, human.When(st.PreparedAt, st.At))
		if !st.ActivatableAt.IsZero() {
			fmt.Fprintf(tw, "activatable\t%s\n", human.When(st.ActivatableAt, st.At))
		}
	default:
		fmt.Fprintf(tw, "prepared generation\t%d\tprepared %s\n", st.Next, human.When(st.PreparedAt, st.At))
	}
	if st.RootPropagation > 0 {
		fmt.Fprintf(tw, "root propagation\t%s\n", human.Duration(time.Duration(st.RootPropagation)))
	}
	if st.RetireAfter > 0 {
		fmt.Fprintf(tw, "old roots retire after\t%s\n", human.Duration(time.Duration(st.RetireAfter)))
	}
	for _, r := range st.Retiring {
		fmt.Fprintf(tw, "retiring root\t%s %s\tuntil %s\n", r.Subject, r.Serial, human.When(r.Until, st.At))
	}
	for _, t := range st.Tainted {
		fmt.Fprintf(tw, "tainted %s\t%s %s\ttainted %s; leaves the bundle once no leaf under it is valid\n", t.Role, t.Subject, t.Serial, human.When(t.At, st.At))
	}
	fmt.Fprintln(tw, "\nCA\tSUBJECT\tSERIAL\tSTATE\tNOT AFTER")
	for _, c := range st.CA {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.Role, c.Subject, c.Serial, c.State, human.When(c.NotAfter, st.At))
	}
	return tw.Flush()
}
