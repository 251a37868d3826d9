package source

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// ParseFile reads the AuthorizationPolicies of one YAML file as every
// reader of policy files does (the Dir source, and so the feed, ext_authz
// and xDS; trustmesh analyze; policy check): the engine's parser
// (policy.ParseYAML), then the engine's check of each policy
// (engine.CheckPolicy), which engine.Build makes too. The Kubernetes
// source and the admission webhook make the same two steps per object
// (kube.ConvertV1), so a file source never publishes a policy the engine
// would refuse, and every reader refuses it with the same error.
func ParseFile(origin string, data []byte, defaultNamespace string) ([]*policy.Policy, error) {
	ps, err := policy.ParseYAML(origin, data, defaultNamespace)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, p := range ps {
		if err := engine.CheckPolicy(p); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return ps, nil
}

// PolicyFiles lists the policy files directly in dir
// (policy.IsPolicyFile), in name order: the files ParseDir reads.
func PolicyFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() && policy.IsPolicyFile(e.Name()) {
			names = append(names, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(names)
	return names, nil
}

// ParseDir reads every policy file directly in dir (PolicyFiles) with
// ParseFile. Two policies with the same namespace and name are refused
// (DuplicateError), and so is a file that holds none: an empty file is
// what a reader sees between an in-place writer's truncation and its first
// write, and loading it would drop every policy the file held. Any error
// refuses the whole directory; the errors of every file are joined.
func ParseDir(dir, defaultNamespace string) ([]*policy.Policy, error) {
	files, err := PolicyFiles(dir)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	var (
		out  []*policy.Policy
		errs []error
	)
	seen := map[string]string{}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy: %w", err))
			continue
		}
		ps, err := ParseFile(path, data, defaultNamespace)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(ps) == 0 {
			errs = append(errs, fmt.Errorf("policy: %s: %w: the file holds no AuthorizationPolicy; a file is refused empty, as one caught between its truncation and its first write would be (delete the file to remove its policies)", path, policy.ErrInvalid))
			continue
		}
		for _, p := range ps {
			if prev, dup := seen[p.Key()]; dup {
				errs = append(errs, DuplicateError(p, prev))
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

// DuplicateError refuses p, whose namespace/name a policy of origin prev
// already has.
func DuplicateError(p *policy.Policy, prev string) error {
	return fmt.Errorf("policy: %s: %w: %s is also defined in %s", p.Origin, policy.ErrInvalid, p.Key(), prev)
}
