package policy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	securityv1beta1 "istio.io/api/security/v1beta1"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The API versions accepted for kind AuthorizationPolicy.
var apiVersions = map[string]bool{
	"security.istio.io/v1":      true,
	"security.istio.io/v1beta1": true,
}

// ParseYAML parses every YAML document in data (named origin in errors).
// Each document must be an AuthorizationPolicy of security.istio.io/v1 or
// v1beta1. Unknown fields are refused, unlike Istio's lenient decoder,
// because an ignored field could widen a policy. A document without a
// namespace gets defaultNamespace.
func ParseYAML(origin string, data []byte, defaultNamespace string) ([]*Policy, error) {
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var (
		out  []*Policy
		errs []error
	)
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("policy: %s: %w", origin, err)
		}
		if len(bytes.TrimSpace(stripComments(raw))) == 0 {
			continue
		}
		where := fmt.Sprintf("%s (document %d)", origin, doc)
		p, err := parseDocument(where, raw, defaultNamespace)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

func stripComments(b []byte) []byte {
	var out []byte
	for _, line := range bytes.Split(b, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' && !bytes.Equal(t, []byte("---")) {
			out = append(out, line...)
		}
	}
	return out
}

type envelope struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		Annotations map[string]string `json:"annotations"`
		Labels      map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec   json.RawMessage `json:"spec"`
	Status json.RawMessage `json:"status"`
}

func parseDocument(origin string, raw []byte, defaultNamespace string) (*Policy, error) {
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("policy: %s: %w", origin, err)
	}
	var env envelope
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("policy: %s: %w", origin, err)
	}
	if env.Kind != "AuthorizationPolicy" || !apiVersions[env.APIVersion] {
		return nil, fmt.Errorf("policy: %s: %w: want kind AuthorizationPolicy of security.istio.io/v1 or v1beta1, got %s %s",
			origin, ErrInvalid, env.APIVersion, env.Kind)
	}
	ns := env.Metadata.Namespace
	if ns == "" {
		ns = defaultNamespace
	}
	spec := &securityv1beta1.AuthorizationPolicy{}
	if len(env.Spec) > 0 && string(env.Spec) != "null" {
		if err := (protojson.UnmarshalOptions{}).Unmarshal(env.Spec, spec); err != nil {
			return nil, &FieldError{Origin: origin, Policy: ns + "/" + env.Metadata.Name, Field: "spec", Err: fmt.Errorf("%w: %w", ErrInvalid, err)}
		}
	}
	return FromSpec(Meta{Namespace: ns, Name: env.Metadata.Name, Annotations: env.Metadata.Annotations, Origin: origin}, spec)
}

// IsPolicyFile reports whether a directory entry is read by ParseDir.
func IsPolicyFile(name string) bool {
	ext := strings.ToLower(filepath.Ext(name))
	return (ext == ".yaml" || ext == ".yml") && !strings.HasPrefix(filepath.Base(name), ".")
}

// ParseDir parses every *.yaml and *.yml file directly in dir, in name
// order. Two policies with the same namespace and name are refused. Any
// error refuses the whole directory.
func ParseDir(dir, defaultNamespace string) ([]*Policy, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() && IsPolicyFile(e.Name()) {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	var (
		out  []*Policy
		errs []error
	)
	seen := map[string]string{}
	for _, n := range names {
		path := filepath.Join(dir, n)
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy: %w", err))
			continue
		}
		ps, err := ParseYAML(path, data, defaultNamespace)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, p := range ps {
			if prev, dup := seen[p.Key()]; dup {
				errs = append(errs, fmt.Errorf("policy: %s: %w: %s is also defined in %s", p.Origin, ErrInvalid, p.Key(), prev))
				continue
			}
			seen[p.Key()] = p.Origin
			out = append(out, p)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}
