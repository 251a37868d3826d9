package analyze

import (
	"context"
	"errors"
	"fmt"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// EngineProviders returns an Input.Providers that asks the engine itself:
// a provider name is defined when engine.Build, given these bundles,
// accepts a CUSTOM policy naming it, exactly as a load would. The error is
// the engine's reason. Bundles that do not compile together are an error
// here, before any policy is judged.
func EngineProviders(ctx context.Context, bundles []engine.NamedBundle) (func(name string) error, error) {
	if _, err := engine.Build(ctx, engine.SetConfig{Bundles: bundles}); err != nil {
		return nil, fmt.Errorf("analyze: %w", err)
	}
	known := map[string]error{}
	return func(name string) error {
		if err, ok := known[name]; ok {
			return err
		}
		probe := &policy.Policy{Namespace: "analyze", Name: "provider", Origin: "analyze", Action: policy.Custom, Provider: name, Rules: []policy.Rule{{}}}
		_, err := engine.Build(ctx, engine.SetConfig{Policies: []*policy.Policy{probe}, Bundles: bundles})
		if err != nil {
			err = providerReason(err)
		}
		known[name] = err
		return err
	}, nil
}

// providerReason returns, of the engine's refusal of the probe policy, the
// innermost error that is still an engine.ErrUnknownProvider: the reason,
// without the probe policy's name around it.
func providerReason(err error) error {
	reason := err
	for e := err; e != nil; e = errors.Unwrap(e) {
		if e != engine.ErrUnknownProvider && errors.Is(e, engine.ErrUnknownProvider) {
			reason = e
		}
	}
	return reason
}
