package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/check"
	"github.com/trustmesh/trustmesh/internal/human"
)

// daysValue is a duration flag that also takes days ("30d").
type daysValue time.Duration

func (d *daysValue) String() string { return human.Duration(time.Duration(*d)) }
func (d *daysValue) Type() string   { return "duration" }
func (d *daysValue) Set(s string) error {
	v, err := check.ParseDuration(s)
	*d = daysValue(v)
	return err
}

func newCheckCmd() *cobra.Command {
	var (
		cfg     check.Config
		dataDir string
		at      string
		failOn  string
		output  outputFormat
	)
	minValidity, maxAge := daysValue(check.DefaultMinValidity), daysValue(check.DefaultMaxCheckpointAge)
	cmd := &cobra.Command{
		Use:   "check --data-dir DIR [--monitoring HOST:PORT] [--policies DIR] [--mesh DIR] [--witness FILE | --witness URL --witness-key VKEY]",
		Short: "Check an installation: the CA, the journal and its witness, the policies and mesh, the running control plane",
		Long: `Check a trustmesh installation before and while it runs, as linkerd check and
istioctl analyze do: the root and intermediate are valid for --min-validity
and the next rotation step; the journal matches its signed checkpoints and
its last checkpoint is fresh; the witness is reachable and consistent (for
a tlog-witness URL, the checkpoint it last cosigned, as serve keeps it in
--data-dir, is verified with --witness-key and the journal held to it); the
policies and the mesh files compile; and, with --monitoring, the control
plane's /readyz and its xDS clients (connected, synced, stale), read from
` + "`GET /debug/xds/clients`" + ` on the monitoring port.

Each finding has a code, a severity (ok, info, warning, error) and a hint.
Exits 0 when no finding is at or above --fail-on, 3 otherwise, 2 on bad flags.
It writes nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level, err := check.ParseFailOn(failOn)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			cfg.Now = time.Now()
			if at != "" {
				if cfg.Now, err = time.Parse(time.RFC3339, at); err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--at: %w", err)}
				}
			}
			cfg.DataDir = admin.DataDir(dataDir)
			cfg.MinValidity, cfg.MaxCheckpointAge = time.Duration(minValidity), time.Duration(maxAge)
			rep, err := check.Run(cmd.Context(), cfg)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			if err := output.print(cmd.OutOrStdout(), rep, func(w io.Writer) error { return printCheck(w, rep) }); err != nil {
				return err
			}
			if rep.Worst() >= level {
				return &exitError{code: exitFindings, err: fmt.Errorf("check: %d error(s), %d warning(s)", rep.Count(check.Error), rep.Count(check.Warning))}
			}
			return nil
		},
	}
	addDataFlags(cmd, &dataDir, &cfg.Journal)
	addCASecretFlag(cmd, &cfg.Journal)
	f := cmd.Flags()
	f.StringVar(&cfg.Monitoring, "monitoring", "", "the control plane's monitoring address (serve's --listen-monitoring), for /readyz and the xDS clients")
	f.StringVar(&cfg.Policies, "policies", "", "the AuthorizationPolicy directory serve loads")
	registerBundleFlags(cmd, &cfg.Bundles)
	f.StringVar(&cfg.RootNamespace, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide, as serve's")
	f.StringVar(&cfg.Mesh, "mesh", "", "the mesh directory serve loads")
	f.StringVar(&cfg.Witness, "witness", "", "serve's --witness: the file or http(s) URL that receives its checkpoints")
	f.StringVar(&cfg.WitnessKey, "witness-key", "", "serve's --witness-key: the cosignature/v1 verifier key of a URL --witness; check verifies the cosigned checkpoint serve keeps in --data-dir with it")
	f.Var(&minValidity, "min-validity", "warn when the active root or intermediate expires within this (e.g. 30d)")
	f.Var(&maxAge, "max-checkpoint-age", "warn when the journal's last checkpoint is older than this")
	f.DurationVar(&cfg.StaleAfter, "stale-after", check.DefaultStaleAfter, "an xDS client that leaves a version unacknowledged this long is stale")
	f.DurationVar(&cfg.Timeout, "timeout", check.DefaultTimeout, "timeout of each request to the control plane and the witness")
	f.StringVar(&at, "at", "", "judge the CA and the journal as of this RFC 3339 time (default now)")
	f.StringVar(&failOn, "fail-on", "error", "exit 3 on findings at or above: info, warning or error")
	addOutputFlag(cmd, &output)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &exitError{code: 2, err: err} })
	return cmd
}

func printCheck(w io.Writer, rep *check.Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STATUS\tCODE\tSUBJECT\tFINDING")
	for _, f := range rep.Findings {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Severity, f.Code, f.Subject, f.Message)
		if f.Hint != "" && f.Severity > check.OK {
			fmt.Fprintf(tw, "\t\t\thint: %s\n", f.Hint)
		}
	}
	if p := rep.Rotation; p != nil {
		switch {
		case p.Due != rotation.Nothing:
			fmt.Fprintf(tw, "\nrotation: %s due since %s\n", p.Due, human.When(p.DueSince, rep.Time))
		case p.Next != rotation.Nothing:
			fmt.Fprintf(tw, "\nrotation: next %s at %s\n", p.Next, human.When(p.At, rep.Time))
		}
	}
	fmt.Fprintf(tw, "\n%d error(s), %d warning(s)\n", rep.Count(check.Error), rep.Count(check.Warning))
	return tw.Flush()
}
