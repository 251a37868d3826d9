package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/injector"
)

func newInjectCmd() *cobra.Command {
	var file, output, meshConfig string
	cmd := &cobra.Command{
		Use:   "inject -f FILE",
		Short: "Inject Envoy and the agent into Kubernetes manifests offline",
		Long: `Inject the trustmesh sidecar into every Pod, Deployment, StatefulSet,
DaemonSet, ReplicaSet, Job and CronJob in FILE ("-" for standard input), as
the admission webhook would, and write the manifests to standard output or
--output. Other objects are copied unchanged. The namespace label cannot be
seen offline: every workload is injected unless it opts out, runs on the host
network, or is in a namespace that is never injected. Workloads in ambient
mode (labelled istio.io/dataplane-mode=ambient, or in a namespace so
labelled among the Namespace objects of FILE) get no sidecar, and those
annotated trustmesh.io/workload-api: node the node agent's socket. A
workload that cannot be injected stops the command with the reason.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			mesh, err := injector.LoadMeshConfig(meshConfig)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			inj, err := injector.New(injector.Config{Mesh: mesh})
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			in := cmd.InOrStdin()
			if file != "-" {
				f, err := os.Open(file)
				if err != nil {
					return err
				}
				defer f.Close()
				in = f
			}
			var out io.Writer = cmd.OutOrStdout()
			var outFile *os.File
			if output != "" {
				if outFile, err = os.Create(output); err != nil {
					return err
				}
				out = outFile
			}
			results, err := inj.InjectManifests(in, out)
			if outFile != nil {
				if cerr := outFile.Close(); err == nil {
					err = cerr
				}
			}
			if err != nil {
				return err
			}
			for _, r := range results {
				if r.Workload && !r.Result.Injected {
					fmt.Fprintf(cmd.ErrOrStderr(), "not injected: %s %s: %s\n", r.Kind, qualifiedName(r.Namespace, r.Name), r.Result.Skipped)
				}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&file, "filename", "f", "", `manifests to inject, "-" for standard input`)
	f.StringVarP(&output, "output", "o", "", "file to write the injected manifests to (default standard output)")
	f.StringVar(&meshConfig, "mesh-config", "", "mesh config file, as the chart renders it (default: built-in defaults)")
	_ = cmd.MarkFlagRequired("filename")
	return cmd
}

func qualifiedName(namespace, name string) string {
	if namespace == "" {
		return name
	}
	return namespace + "/" + name
}
