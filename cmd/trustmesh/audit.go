package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/witness"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/human"
)

// exitFindings is the exit code of an audit that found something.
const exitFindings = 3

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Audit the CA's journal: history, tamper checks, inclusion proofs, rotation",
	}
	cmd.AddCommand(newAuditLogCmd(), newAuditVerifyCmd(), newAuditProveCmd(), newAuditCheckProofCmd(), newAuditRotationCmd(), newAuditNodesCmd(), newAuditMonitorCmd(), newAuditCosignedCmd())
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

func newAuditMonitorCmd() *cobra.Command {
	var dir, key, name, listen string
	var from []string
	var interval time.Duration
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "monitor",
		Short: "Witness the journal: keep every checkpoint, refuse rollbacks, forks and split views",
		Long: `Read the journal's latest signed checkpoint from each --from source and
accept it into the witness directory --witness only when the journal's
checkpoint key signed it and a consistency proof (fetched from the same
source) shows it extends the last checkpoint the witness accepted. The
witness keeps every checkpoint it accepted, and every one it refused as
evidence. A source is the monitoring address of trustmesh serve
(http://HOST:PORT/journal), a data directory, or the PostgreSQL URL of a
shared journal; give --from more than once to catch a split view (two
different trees of the same size).

Once (the default), it exits 3 on a rollback, fork, split view or forged
checkpoint, and 1 when a source could not be read. With --interval it goes
on, logs each finding and counts it in trustmesh_witness_findings_total,
served with the C2SP tlog-witness add-checkpoint API on --listen.

The first run needs --key, the journal's checkpoint verifier key (the data
directory's checkpoint.pub, from the CA operator); the witness records it
and refuses another key for the same log later.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			sources, err := monitorSources(from)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			w, err := witness.Open(dir, name, time.Now)
			if err != nil {
				return err
			}
			defer w.Close()
			origin, err := monitorOrigin(ctx, w, key, sources)
			if err != nil {
				return err
			}
			reg := prometheus.NewRegistry()
			m := &witness.Monitor{W: w, Origin: origin, Sources: sources, Metrics: witness.NewMetrics(reg)}
			if interval <= 0 {
				rep := m.Once(ctx)
				if err := output.print(cmd.OutOrStdout(), rep, func(out io.Writer) error { return printMonitor(out, rep) }); err != nil {
					return err
				}
				return monitorExit(rep)
			}
			return runMonitor(ctx, m, reg, listen, interval, cmd.OutOrStdout())
		},
	}
	cmd.Flags().StringVar(&dir, "witness", "", "the witness's directory: its key and every checkpoint it accepted (required)")
	cmd.Flags().StringArrayVar(&from, "from", nil, "where to read the journal: http(s)://HOST:PORT/journal of trustmesh serve's monitoring address, a data directory, or a postgres:// journal URL (repeatable; required)")
	cmd.Flags().StringVar(&key, "key", "", "the journal's checkpoint verifier key (required the first time; then the one the witness recorded)")
	cmd.Flags().StringVar(&name, "name", defaultWitnessName(), "the witness's key name, used when its key is created")
	cmd.Flags().DurationVar(&interval, "interval", 0, "read the sources every interval until interrupted (default: once)")
	cmd.Flags().StringVar(&listen, "listen", "", "with --interval, serve /metrics and the tlog-witness /add-checkpoint API on this address")
	addOutputFlag(cmd, &output)
	_ = cmd.MarkFlagRequired("witness")
	_ = cmd.MarkFlagRequired("from")
	return cmd
}

func defaultWitnessName() string {
	h, err := os.Hostname()
	if err != nil || h == "" || strings.ContainsAny(h, "+ \t\n") {
		h = "localhost"
	}
	return "trustmesh.witness/" + h
}

// monitorSources turns each --from into a source.
func monitorSources(from []string) ([]witness.Source, error) {
	var sources []witness.Source
	for _, f := range from {
		switch {
		case journal.IsURL(f):
			s, err := witness.NewHTTPSource(f)
			if err != nil {
				return nil, err
			}
			sources = append(sources, s)
		case strings.HasPrefix(f, "postgres://") || strings.HasPrefix(f, "postgresql://"):
			dsn := f
			sources = append(sources, witness.NewStoreSource(redactDSN(f), func(ctx context.Context) (*journal.Store, error) {
				st, _, err := admin.DataDir("").OpenExisting(ctx, admin.JournalOptions{DSN: dsn})
				return st, err
			}))
		default:
			if err := journal.CheckTarget(f); err != nil {
				return nil, fmt.Errorf("--from: %w", err)
			}
			d := admin.DataDir(f)
			sources = append(sources, witness.NewStoreSource(f, func(ctx context.Context) (*journal.Store, error) {
				st, _, err := d.OpenExisting(ctx, admin.JournalOptions{})
				return st, err
			}))
		}
	}
	return sources, nil
}

// monitorOrigin follows the log whose key is key, or, without one, the log
// the sources name, whose key the witness must have recorded.
func monitorOrigin(ctx context.Context, w *witness.Witness, key string, sources []witness.Source) (string, error) {
	if key != "" {
		return w.AddLog("", key)
	}
	var errs []error
	for _, s := range sources {
		signed, err := s.Checkpoint(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		first, _, _ := bytes.Cut(signed, []byte("\n"))
		origin, err := w.AddLog(string(first), "")
		if err != nil {
			return "", fmt.Errorf("%w (pass --key)", err)
		}
		return origin, nil
	}
	return "", fmt.Errorf("no source could be read to learn the log's origin: %w", errors.Join(errs...))
}

func monitorExit(rep *witness.Report) error {
	if len(rep.Findings) > 0 {
		return &exitError{code: exitFindings, err: fmt.Errorf("the journal showed %d contradicting checkpoint(s): %s", len(rep.Findings), rep.Findings[0].Kind)}
	}
	if rep.Unreachable() {
		return &exitError{code: 1, err: errors.New("a source could not be read or checked")}
	}
	return nil
}

func printMonitor(w io.Writer, rep *witness.Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "log %s: accepted size %d\n\n", rep.Origin, rep.Accepted)
	fmt.Fprintln(tw, "SOURCE\tSIZE\tROOT\tACCEPTED\tERROR")
	for _, o := range rep.Observations {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%v\t%s\n", o.Source, o.Size, o.Root, o.Accepted, o.Error)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, f := range rep.Findings {
		fmt.Fprintf(w, "%s at size %d from %s: %s\n", strings.ToUpper(f.Kind), f.Size, strings.Join(f.Sources, ", "), f.Detail)
		for _, e := range f.Evidence {
			fmt.Fprintf(w, "  evidence: %s\n", e)
		}
	}
	if len(rep.Findings) == 0 && !rep.Unreachable() {
		_, err := fmt.Fprintln(w, "OK: every source extends the witnessed history")
		return err
	}
	return nil
}

// runMonitor reads the sources every interval until ctx ends, logging
// findings and counting them; with listen it serves the metrics and the
// tlog-witness API.
func runMonitor(ctx context.Context, m *witness.Monitor, reg *prometheus.Registry, listen string, interval time.Duration, out io.Writer) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if listen != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.Handle(witness.AddCheckpointPath, witness.Handler(m.W))
		ln, err := net.Listen("tcp", listen)
		if err != nil {
			return &exitError{code: 2, err: fmt.Errorf("--listen: %w", err)}
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		fmt.Fprintf(out, "serving /metrics and %s on %s\n", witness.AddCheckpointPath, ln.Addr())
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		rep := m.Once(ctx)
		for _, f := range rep.Findings {
			log.Error("the journal showed a contradicting checkpoint", "kind", f.Kind, "size", f.Size, "sources", f.Sources, "detail", f.Detail, "evidence", f.Evidence)
		}
		for _, o := range rep.Observations {
			if o.Error != "" {
				log.Warn("could not read or check a source", "source", o.Source, "error", o.Error)
			}
		}
		log.Info("witnessed", "origin", rep.Origin, "accepted_size", rep.Accepted, "findings", len(rep.Findings))
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// redactDSN shows a PostgreSQL URL without its credentials and options.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "(a journal URL that does not parse)"
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
}

func newAuditCosignedCmd() *cobra.Command {
	var dataDir, file, key, witnessKey string
	var output outputFormat
	cmd := &cobra.Command{
		Use:   "cosigned",
		Short: "Show the latest checkpoint serve's tlog-witness cosigned, both signatures verified",
		Long: `Read the checkpoint serve --witness URL --witness-key keeps in its data
directory (` + journal.WitnessCosignedFile + `, or --file), verify the journal's
signature (--key, default the data directory's checkpoint.pub) and the
witness's cosignature (--witness-key), and print its size, root and when the
witness cosigned it. To hold the journal to it, run
trustmesh audit verify --checkpoint FILE.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				file = filepath.Join(dataDir, journal.WitnessCosignedFile)
			}
			if key == "" {
				b, err := os.ReadFile(admin.DataDir(dataDir).CheckpointPubPath())
				if err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--key not given and the data directory has no checkpoint key: %w", err)}
				}
				key = strings.TrimSpace(string(b))
			}
			b, err := os.ReadFile(file)
			if err != nil {
				return fmt.Errorf("the witness's cosigned checkpoint: %w", err)
			}
			c, err := journal.OpenCosigned(b, key, witnessKey)
			if err != nil {
				return &exitError{code: exitFindings, err: err}
			}
			view := struct {
				Origin  string    `json:"origin"`
				Size    uint64    `json:"size"`
				Root    []byte    `json:"root"`
				Witness string    `json:"witness"`
				At      time.Time `json:"cosigned_at"`
			}{c.Origin, c.Size, c.Root, c.Witness, c.At}
			return output.print(cmd.OutOrStdout(), view, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "%s cosigned %s at size %d (root %x) at %s\n", c.Witness, c.Origin, c.Size, c.Root, c.At.Format(time.RFC3339))
				return err
			})
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", controlplane.DefaultDataDir, "the CA's data directory")
	cmd.Flags().StringVar(&file, "file", "", "the cosigned checkpoint (default: DATA-DIR/"+journal.WitnessCosignedFile+")")
	cmd.Flags().StringVar(&key, "key", "", "the checkpoint verifier key (default: the data directory's checkpoint.pub)")
	cmd.Flags().StringVar(&witnessKey, "witness-key", "", "the witness's cosignature/v1 verifier key, as given to serve --witness-key (required)")
	_ = cmd.MarkFlagRequired("witness-key")
	addOutputFlag(cmd, &output)
	return cmd
}
