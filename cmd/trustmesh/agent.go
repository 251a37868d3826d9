package main

import (
	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/agent/cli"
)

// newAgentCmd is the agent's command, defined once in agent/cli and shared
// with the trustmesh-agent binary.
func newAgentCmd() *cobra.Command { return cli.NewCommand("agent") }
