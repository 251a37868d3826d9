package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/human"
)

// exitFindings is the exit code of an audit that found something.
const exitFindings = 3

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Audit the CA's journal: history, tamper checks, inclusion proofs, rotation",
	}
	cmd.AddCommand(newAuditLogCmd(), newAuditVerifyCmd(), newAuditProveCmd(), newAuditCheckProofCmd(), newAuditRotationCmd(), newAuditNodesCmd())
	return cmd
}

func newAuditLogCmd() *cobra.Command {
	var dataDir, since, id string
	var output outputFormat
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "log",
		Short: "Show the issuance and refusal history",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := audit.Filter{SPIFFEID: id}
			if since != "" {
				t, err := time.Parse(time.RFC3339, since)
				if err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--since: %w", err)}
				}
				f.Since = t
			}
			rows, err := admin.AuditLog(cmd.Context(), admin.DataDir(dataDir), jo, f)
			if err != nil {
				return err
			}
			return output.print(cmd.OutOrStdout(), rows, func(w io.Writer) error { return printLog(w, rows) })
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&since, "since", "", "only entries at or after this RFC 3339 time")
	cmd.Flags().StringVar(&id, "spiffe-id", "", "only entries about this SPIFFE ID")
	addOutputFlag(cmd, &output)
	return cmd
}

func printLog(w io.Writer, rows []audit.Row) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INDEX\tTIME\tKIND\tSPIFFE ID\tSERIAL\tCALLER\tNOT AFTER\tREASON/DETAIL")
	for _, r := range rows {
		na := ""
		if !r.NotAfter.IsZero() {
			na = human.Time(r.NotAfter)
		}
		detail := r.Detail
		if r.Reason != "" {
			detail = fmt.Sprintf("%s x%d", r.Reason, r.Count)
		}
		if r.Node != "" {
			detail = "node " + r.Node
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Index, human.Time(r.Time), r.Kind, r.SPIFFEID, r.Serial, r.Caller, na, detail)
	}
	return tw.Flush()
}

func newAuditVerifyCmd() *cobra.Command {
	var dataDir, key string
	var output outputFormat
	var witness []string
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Recompute the journal and check it against its signed checkpoints",
		Long: `Recompute the journal's Merkle log and check it against every stored
checkpoint and every --checkpoint file (a witness's copy), proving consistency
between them. Exits 3 and says where, when anything was changed, deleted,
inserted, reordered or cut off, or a checkpoint was forged.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := admin.AuditVerify(cmd.Context(), admin.DataDir(dataDir), jo, key, witness)
			if err != nil {
				return err
			}
			err = output.print(cmd.OutOrStdout(), rep, func(w io.Writer) error {
				fmt.Fprintf(w, "entries: %d  checkpoints: %d  witnessed size: %d\n", rep.Entries, rep.Checkpoints, rep.Witnessed)
				for _, f := range rep.Findings {
					fmt.Fprintf(w, "TAMPERED %s [%d, %d): %s\n", f.Kind, f.From, f.To, f.Detail)
				}
				if rep.OK() {
					_, err := fmt.Fprintln(w, "OK: the journal matches every checkpoint")
					return err
				}
				return nil
			})
			if err != nil {
				return err
			}
			if !rep.OK() {
				return &exitError{code: exitFindings, err: fmt.Errorf("the journal does not match its checkpoints (%d finding(s))", len(rep.Findings))}
			}
			return nil
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringArrayVar(&witness, "checkpoint", nil, "a witness's signed checkpoint file (repeatable)")
	cmd.Flags().StringVar(&key, "key", "", "the checkpoint verifier key (default: the data directory's checkpoint.pub)")
	addOutputFlag(cmd, &output)
	return cmd
}

func newAuditProveCmd() *cobra.Command {
	var dataDir, serial string
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "prove",
		Short: "Print an inclusion proof of an issued certificate and the signed checkpoint",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := admin.AuditProve(cmd.Context(), admin.DataDir(dataDir), jo, serial)
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), p)
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&serial, "serial", "", "certificate serial number in hex, as the journal or openssl x509 -serial prints it (required)")
	_ = cmd.MarkFlagRequired("serial")
	return cmd
}

func newAuditCheckProofCmd() *cobra.Command {
	var key, file string
	cmd := &cobra.Command{
		Use:   "check-proof",
		Short: "Check an inclusion proof with the public checkpoint key alone",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b, err := os.ReadFile(file)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			var p journal.InclusionProof
			if err := json.Unmarshal(b, &p); err != nil {
				return &exitError{code: 2, err: fmt.Errorf("%s: %w", file, err)}
			}
			entry, err := journal.CheckProof(&p, key)
			if err != nil {
				return &exitError{code: exitFindings, err: err}
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "OK: entry %d is in the log signed by %s\n%s\n", p.Index, key, entry)
			return err
		},
	}
	cmd.Flags().StringVar(&key, "key", "", "the checkpoint verifier key, from the CA operator (required)")
	cmd.Flags().StringVar(&file, "proof", "", "the proof JSON from trustmesh audit prove (required)")
	_ = cmd.MarkFlagRequired("key")
	_ = cmd.MarkFlagRequired("proof")
	return cmd
}

func newAuditRotationCmd() *cobra.Command {
	var dataDir, at, failOn string
	var output outputFormat
	var horizon time.Duration
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "rotation",
		Short: "Report whether every workload and the CA rotated in time",
		Long: `Report each identity's last issuance, current expiry and whether it renewed
within its window; certificates expiring within --horizon; identities that
stopped renewing; and the CA certificates' expiry and rotation state. Exits 3
when a finding is at or above --fail-on, so it can gate a pipeline.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level, err := audit.ParseLevel(failOn)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			when := time.Now()
			if at != "" {
				if when, err = time.Parse(time.RFC3339, at); err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--at: %w", err)}
				}
			}
			rep, err := admin.AuditRotation(cmd.Context(), admin.DataDir(dataDir), jo, when, horizon)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if err := output.print(out, rep, func(w io.Writer) error { return printRotation(w, rep, horizon) }); err != nil {
				return err
			}
			if rep.Worst() >= level {
				return &exitError{code: exitFindings, err: fmt.Errorf("rotation audit found %s findings", rep.Worst())}
			}
			return nil
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	addCASecretFlag(cmd, &jo)
	cmd.Flags().StringVar(&at, "at", "", "audit as of this RFC 3339 time (default now)")
	cmd.Flags().DurationVar(&horizon, "horizon", 7*24*time.Hour, "report certificates expiring within this window")
	cmd.Flags().StringVar(&failOn, "fail-on", "critical", "exit 3 on findings at or above: info, warning or critical")
	addOutputFlag(cmd, &output)
	return cmd
}

func printRotation(w io.Writer, rep *audit.RotationReport, horizon time.Duration) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "rotation audit at %s, horizon %s\n\n", human.Time(rep.At), human.Duration(horizon))
	fmt.Fprintln(tw, "CA\tSUBJECT\tSERIAL\tSTATE\tNOT AFTER")
	for _, c := range rep.CA {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.Role, c.Subject, c.Serial, c.State, human.When(c.NotAfter, rep.At))
	}
	fmt.Fprintln(tw, "\nIDENTITY\tNODE\tSTATUS\tLAST ISSUED\tEXPIRES\tRENEWALS\tLATE\tLAPSES\tIN TIME")
	for _, i := range rep.Identities {
		node := i.Node
		if node == "" {
			node = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%v\n", i.SPIFFEID, node, i.Status, human.Time(i.LastIssued),
			human.When(i.Expires, rep.At), i.Renewals, i.LateRenewals, i.Lapses, i.RenewedInTime)
	}
	if len(rep.Nodes) > 0 {
		fmt.Fprintln(tw)
		printNodeRows(tw, rep.Nodes, rep.At)
	}
	fmt.Fprintf(tw, "\n%d certificate(s) expire within the horizon\n", len(rep.Expiring))
	if len(rep.Findings) > 0 {
		fmt.Fprintln(tw, "\nLEVEL\tFINDING\tSUBJECT\tDETAIL")
		for _, f := range rep.Findings {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Level, f.Kind, f.Subject, f.Detail)
		}
	}
	return tw.Flush()
}

func newAuditNodesCmd() *cobra.Command {
	var dataDir, at, node string
	var output outputFormat
	var jo admin.JournalOptions
	cmd := &cobra.Command{
		Use:   "nodes",
		Short: "Show which node holds which identities",
		Long: `Show, for each node agent, the certificates it obtained for workloads by
delegated issuance that are valid now (or at --at): each identity's SPIFFE ID,
the serial of the node's latest certificate for it and when it expires. A
certificate stays valid until it expires even after its workload left the
node; "revoked" marks an identity revoked after the certificate was issued.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			when := time.Now()
			if at != "" {
				var err error
				if when, err = time.Parse(time.RFC3339, at); err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--at: %w", err)}
				}
			}
			nodes, err := admin.AuditNodes(cmd.Context(), admin.DataDir(dataDir), jo, when)
			if err != nil {
				return err
			}
			if node != "" {
				var one []audit.NodeHolding
				for _, n := range nodes {
					if n.Node == node {
						one = append(one, n)
					}
				}
				nodes = one
			}
			if nodes == nil {
				nodes = []audit.NodeHolding{}
			}
			return output.print(cmd.OutOrStdout(), nodes, func(w io.Writer) error {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				printNodeRows(tw, nodes, when)
				return tw.Flush()
			})
		},
	}
	addDataFlags(cmd, &dataDir, &jo)
	cmd.Flags().StringVar(&at, "at", "", "as of this RFC 3339 time (default now)")
	cmd.Flags().StringVar(&node, "node", "", "only this node")
	addOutputFlag(cmd, &output)
	return cmd
}

// printNodeRows writes one row per identity a node holds.
func printNodeRows(tw io.Writer, nodes []audit.NodeHolding, at time.Time) {
	fmt.Fprintln(tw, "NODE\tIDENTITY\tSERIAL\tNOT AFTER\tREVOKED")
	for _, n := range nodes {
		for _, i := range n.Identities {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\n", n.Node, i.SPIFFEID, i.Serial, human.When(i.NotAfter, at), i.Revoked)
		}
	}
}
