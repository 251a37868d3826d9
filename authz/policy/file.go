package policy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
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
	// line is the file's line that the next document starts on: the
	// reader returns each document's lines as they are, and drops the
	// "---" line that ends one.
	line := 1
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("policy: %s: %w", origin, err)
		}
		first := line
		line += bytes.Count(raw, []byte("\n")) + 1
		if len(bytes.TrimSpace(stripComments(raw))) == 0 {
			continue
		}
		where := fmt.Sprintf("%s (document %d)", origin, doc)
		p, err := parseDocument(where, raw, first, defaultNamespace)
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

// parseDocument parses one document, which starts on line first of its file.
func parseDocument(origin string, raw []byte, first int, defaultNamespace string) (*Policy, error) {
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("policy: %s: %w", origin, err)
	}
	// The name first, leniently, so that every refusal can name the policy.
	var env envelope
	_ = json.Unmarshal(js, &env)
	ns := env.Metadata.Namespace
	if ns == "" {
		ns = defaultNamespace
	}
	key := ns + "/" + env.Metadata.Name
	// Unknown fields, with their lines and the nearest known field, before
	// the strict decoders below, which report positions in internal JSON.
	loc := locate(raw, first)
	if len(loc.unknown) > 0 {
		errs := make([]error, len(loc.unknown))
		for i, u := range loc.unknown {
			errs[i] = &FieldError{Origin: origin, Policy: key, Field: u.field, Line: u.line, Err: fmt.Errorf("%w: %s", ErrInvalid, u.message())}
		}
		return nil, errors.Join(errs...)
	}
	env = envelope{}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("policy: %s: %w", origin, err)
	}
	if env.Kind != "AuthorizationPolicy" || !apiVersions[env.APIVersion] {
		return nil, fmt.Errorf("policy: %s: %w: want kind AuthorizationPolicy of security.istio.io/v1 or v1beta1, got %s %s",
			origin, ErrInvalid, env.APIVersion, env.Kind)
	}
	spec := &securityv1beta1.AuthorizationPolicy{}
	if len(env.Spec) > 0 && string(env.Spec) != "null" {
		if err := (protojson.UnmarshalOptions{}).Unmarshal(env.Spec, spec); err != nil {
			// protojson's "(line 1:57)" is a position in internal JSON,
			// which means nothing to the author of the YAML.
			msg := jsonPosition.ReplaceAllString(err.Error(), "")
			return nil, &FieldError{Origin: origin, Policy: key, Field: "spec", Line: loc.line("spec"), Err: fmt.Errorf("%w: %s", ErrInvalid, msg)}
		}
	}
	p, err := FromSpec(Meta{Namespace: ns, Name: env.Metadata.Name, Annotations: env.Metadata.Annotations, Origin: origin}, spec)
	if err != nil {
		loc.setLines(err)
		return nil, err
	}
	return p, nil
}

// jsonPosition matches protojson's position in its input.
var jsonPosition = regexp.MustCompile(`\(line \d+:\d+\): `)

// IsPolicyFile reports whether a directory entry is a policy file, as a
// directory of them is read (authz/source.ParseDir).
func IsPolicyFile(name string) bool {
	ext := strings.ToLower(filepath.Ext(name))
	return (ext == ".yaml" || ext == ".yml") && !strings.HasPrefix(filepath.Base(name), ".")
}
