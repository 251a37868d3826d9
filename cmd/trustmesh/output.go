package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

// outputFormat is the value of an -o flag. Unknown formats are refused when
// the flag is parsed, before the command does anything.
type outputFormat string

const (
	outputTable outputFormat = "table"
	outputJSON  outputFormat = "json"
	outputYAML  outputFormat = "yaml"
)

var outputFormats = []outputFormat{outputTable, outputJSON, outputYAML}

func (o *outputFormat) String() string { return string(*o) }
func (o *outputFormat) Type() string   { return "format" }

func (o *outputFormat) Set(s string) error {
	for _, f := range outputFormats {
		if string(f) == s {
			*o = f
			return nil
		}
	}
	return fmt.Errorf("output format %q is not one of table, json or yaml", s)
}

// addOutputFlag adds -o/--output (table, json or yaml; default table).
func addOutputFlag(cmd *cobra.Command, o *outputFormat) {
	*o = outputTable
	cmd.Flags().VarP(o, "output", "o", "output format: table, json or yaml")
}

// print writes v as JSON or YAML, or calls table for the table form. YAML is
// made from the JSON form, so its field names and values are the JSON ones.
func (o outputFormat) print(w io.Writer, v any, table func(io.Writer) error) error {
	switch o {
	case outputJSON:
		return printJSON(w, v)
	case outputYAML:
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		y, err := yaml.JSONToYAML(b)
		if err != nil {
			return err
		}
		_, err = w.Write(y)
		return err
	case outputTable, "":
		return table(w)
	}
	return fmt.Errorf("output format %q is not one of table, json or yaml", string(o))
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
