package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/analyze"
	"github.com/trustmesh/trustmesh/authz/engine"
)

func newAnalyzeCmd() *cobra.Command {
	var (
		cfg        analyze.Config
		kubeconfig string
		kubeCtx    string
		at         string
		failOn     string
		output     outputFormat
	)
	stale := daysValue(analyze.DefaultStaleDryRun)
	cmd := &cobra.Command{
		Use:   "analyze (-f DIR|FILE... [--mesh DIR] | --kubeconfig FILE)",
		Short: "Lint AuthorizationPolicies and mesh objects beyond validity, offline or on a cluster",
		Long: `Report what the engine refuses (TMA000) and what it accepts but probably does
not do what was meant: selectors that match no workload, identities the mesh
does not have or of a foreign trust domain, dead or shadowed rules, empty
rules, HTTP-only fields on TCP ports, stale dry-run policies, CUSTOM
providers no bundle defines, and mesh objects trustmesh does not honour, as
istioctl analyze does. analyze/README.md lists the codes.

Offline, it reads AuthorizationPolicy files or directories (-f, repeatable)
and a mesh directory (--mesh). -f may hold mixed manifests:
PeerAuthentications, ServiceEntries, Gateways and VirtualServices are
checked as the admission webhook checks them, other kinds are skipped with
a note. On a cluster (--kubeconfig), every AuthorizationPolicy with its
creation time and the mesh as serve reads it; the root namespace and trust
domain, unless given, are those of the trustmesh control plane's flags
(the Deployment running trustmesh serve), and a note says where they came
from.
An analyzer that lacks its input (no mesh, no bundle, no cluster) is skipped
with a note.

Exits 0 when no finding is at or above --fail-on, 3 otherwise, 2 on bad
flags or input that cannot be read. It writes nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level, err := analyze.ParseFailOn(failOn)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			if at != "" {
				if cfg.Now, err = time.Parse(time.RFC3339, at); err != nil {
					return &exitError{code: 2, err: fmt.Errorf("--at: %w", err)}
				}
			}
			if kubeconfig != "" || kubeCtx != "" {
				cfg.Cluster = &analyze.ClusterConfig{Kubeconfig: kubeconfig, Context: kubeCtx}
			}
			cfg.StaleDryRun = time.Duration(stale)
			rep, err := analyze.Analyze(cmd.Context(), cfg)
			if err != nil {
				if errors.Is(err, analyze.ErrBadInput) {
					return &exitError{code: 2, err: err}
				}
				return err
			}
			if err := output.print(cmd.OutOrStdout(), rep, func(w io.Writer) error { return printAnalyze(w, rep) }); err != nil {
				return err
			}
			if output == outputTable {
				for _, n := range rep.Notes {
					fmt.Fprintln(cmd.ErrOrStderr(), "note:", n)
				}
			}
			if rep.Fails(level) {
				return &exitError{code: exitFindings, err: fmt.Errorf("analyze: %d error(s), %d warning(s), %d info at or above --fail-on %s",
					rep.Count(analyze.SeverityError), rep.Count(analyze.SeverityWarning), rep.Count(analyze.SeverityInfo), failOn)}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&cfg.Files, "filename", "f", nil, "AuthorizationPolicy YAML file or directory (repeatable); a directory's bundles.txt names its Rego bundles")
	f.StringVar(&cfg.MeshDir, "mesh", "", "mesh directory, as serve's --mesh (Services, Workloads, ServiceEntries, PeerAuthentications, ...)")
	f.StringVar(&kubeconfig, "kubeconfig", "", "analyze the cluster of this kubeconfig instead of files")
	f.StringVar(&kubeCtx, "context", "", "kubeconfig context to use (default the current one)")
	f.StringVar(&cfg.RootNamespace, "root-namespace", "", "namespace whose policies apply mesh-wide (default: on a cluster, the control plane's; else "+engine.DefaultRootNamespace+")")
	f.StringVar(&cfg.TrustDomain, "trust-domain", "", "the mesh's trust domain (default: on a cluster, the control plane's; else "+analyze.DefaultTrustDomain+")")
	f.Var(&stale, "stale-dry-run", "report dry-run policies older than this (e.g. 14d, 36h); needs a cluster")
	f.StringVar(&at, "at", "", "judge the policies' age as of this RFC 3339 time (default now)")
	f.StringVar(&failOn, "fail-on", "error", "exit 3 on findings at or above: error, warning, info, or none")
	registerBundleFlags(cmd, &cfg.Bundles)
	addOutputFlag(cmd, &output)
	return cmd
}

func printAnalyze(w io.Writer, rep analyze.Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if len(rep.Findings) > 0 {
		fmt.Fprintln(tw, "SEVERITY\tCODE\tOBJECT\tFIELD\tMESSAGE")
	}
	for _, f := range rep.Findings {
		field := f.Field
		if field == "" {
			field = "-"
		}
		lines := strings.Split(f.Message, "\n")
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", f.Severity, f.Code, f.Object, field, lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(tw, "\t\t\t\t%s\n", l)
		}
		if f.Origin != "" {
			fmt.Fprintf(tw, "\t\t\t\tin %s\n", f.Origin)
		}
	}
	if len(rep.Findings) > 0 {
		fmt.Fprintln(tw)
	}
	fmt.Fprintf(tw, "%d error(s), %d warning(s), %d info\n",
		rep.Count(analyze.SeverityError), rep.Count(analyze.SeverityWarning), rep.Count(analyze.SeverityInfo))
	return tw.Flush()
}
