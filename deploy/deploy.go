// Package deploy holds trustmesh's Helm chart (charts/trustmesh), embedded
// in the binary, and renders it with Helm's Go library exactly as
// `helm install` would: values checked against values.schema.json, templates
// rendered, manifests sorted in Helm's install order.
package deploy

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/trustmesh/trustmesh/api/identity"
)

//go:embed all:charts/trustmesh
var charts embed.FS

// ChartDir is the chart's directory within the embedded files.
const ChartDir = "charts/trustmesh"

// DefaultNamespace is where the chart is installed unless told otherwise.
const DefaultNamespace = identity.Namespace

// Chart loads the embedded chart.
func Chart() (*chart.Chart, error) {
	var files []*loader.BufferedFile
	err := fs.WalkDir(charts, ChartDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := charts.ReadFile(p)
		if err != nil {
			return err
		}
		files = append(files, &loader.BufferedFile{Name: strings.TrimPrefix(p, ChartDir+"/"), Data: data})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("deploy: read chart: %w", err)
	}
	c, err := loader.LoadFiles(files)
	if err != nil {
		return nil, fmt.Errorf("deploy: load chart: %w", err)
	}
	return c, nil
}

// RenderOptions are a release's name, namespace and values.
type RenderOptions struct {
	// ReleaseName defaults to "trustmesh".
	ReleaseName string
	// Namespace defaults to DefaultNamespace.
	Namespace string
	// Values override the chart's values.yaml, as with --values.
	Values map[string]any
}

// ErrInvalidValues wraps a values.schema.json violation.
var ErrInvalidValues = errors.New("values do not match values.schema.json")

// Render renders the chart and returns its objects in Helm's install order
// (namespaces, then service accounts, configuration, CRDs, RBAC,
// workloads).
func Render(opts RenderOptions) ([]*unstructured.Unstructured, error) {
	rendered, err := render(opts)
	if err != nil {
		return nil, err
	}
	for name := range rendered {
		if path.Ext(name) != ".yaml" && path.Ext(name) != ".yml" {
			delete(rendered, name)
		}
	}
	caps := chartutil.DefaultCapabilities
	hooks, manifests, err := releaseutil.SortManifests(rendered, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("deploy: sort manifests: %w", err)
	}
	if len(hooks) > 0 {
		return nil, fmt.Errorf("deploy: the chart has hooks, which Render does not run")
	}
	var objs []*unstructured.Unstructured
	for _, m := range manifests {
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader([]byte(m.Content)), 4096)
		for {
			var obj map[string]any
			if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return nil, fmt.Errorf("deploy: %s: %w", m.Name, err)
			}
			if len(obj) == 0 {
				continue
			}
			objs = append(objs, &unstructured.Unstructured{Object: obj})
		}
	}
	return objs, nil
}

// render renders every template of the chart, NOTES.txt too, by name.
func render(opts RenderOptions) (map[string]string, error) {
	if opts.ReleaseName == "" {
		opts.ReleaseName = "trustmesh"
	}
	if opts.Namespace == "" {
		opts.Namespace = DefaultNamespace
	}
	c, err := Chart()
	if err != nil {
		return nil, err
	}
	vals := opts.Values
	if vals == nil {
		vals = map[string]any{}
	}
	if err := chartutil.ProcessDependenciesWithMerge(c, vals); err != nil {
		return nil, fmt.Errorf("deploy: %w", err)
	}
	merged, err := chartutil.CoalesceValues(c, vals)
	if err != nil {
		return nil, fmt.Errorf("deploy: values: %w", err)
	}
	if err := chartutil.ValidateAgainstSchema(c, merged); err != nil {
		return nil, fmt.Errorf("deploy: %w: %w", ErrInvalidValues, err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	top, err := chartutil.ToRenderValues(c, vals, chartutil.ReleaseOptions{
		Name: opts.ReleaseName, Namespace: opts.Namespace, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		return nil, fmt.Errorf("deploy: values: %w", err)
	}
	rendered, err := engine.Render(c, top)
	if err != nil {
		return nil, fmt.Errorf("deploy: render: %w", err)
	}
	return rendered, nil
}

// Notes renders the chart's NOTES.txt, which helm prints after an install.
func Notes(opts RenderOptions) (string, error) {
	rendered, err := render(opts)
	if err != nil {
		return "", err
	}
	for name, text := range rendered {
		if path.Base(name) == "NOTES.txt" {
			return text, nil
		}
	}
	return "", errors.New("deploy: the chart has no NOTES.txt")
}
