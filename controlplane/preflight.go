package controlplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/mesh"
)

// Check is `serve --validate`: every check a start makes short of binding
// its ports and opening the data directory. Validate checks the settings;
// Check also reads what they name: the policies parse and compile with
// their bundles, the mesh directory and the injector's mesh config parse, operator-supplied CA material loads, and
// the CA and checkpoint key URIs open with the KMS back ends this binary
// has. It writes nothing.
func Check(ctx context.Context, cfg Config) error {
	v, err := cfg.validate()
	if err != nil {
		return err
	}
	return v.checkInputs(ctx)
}

// checkInputs reads every input the configuration names, as a start would,
// and reports all that fail. New runs it before it creates anything.
func (v *validated) checkInputs(ctx context.Context) error {
	var errs []error
	if v.Authz.PolicyDir != "" {
		// Parse and compile the policies with their bundles, as the
		// authorization service's first load does.
		l, err := source.New(source.Config{
			Engine: engine.New(), Policies: &source.Dir{Path: v.Authz.PolicyDir, DefaultNamespace: "default"},
			Bundles: v.bundles, RootNamespace: v.Authz.RootNamespace,
		})
		if err == nil {
			_, err = l.Build(ctx)
		}
		errs = append(errs, inGroup("Authz", setting("policies", err)))
	}
	if v.XDS.MeshDir != "" {
		_, err := (&mesh.Dir{Path: v.XDS.MeshDir}).Mesh()
		errs = append(errs, inGroup("XDS", setting("mesh", err)))
	}
	if v.Injector.MeshConfig != "" {
		_, err := injector.LoadMeshConfig(v.Injector.MeshConfig)
		errs = append(errs, inGroup("Injector", setting("mesh-config", err)))
	}
	var keyErr error
	if v.CA.KeyURI != "" {
		_, keyErr = authority.OpenSigner(ctx, v.CA.KeyURI)
		errs = append(errs, inGroup("CA", setting("ca-key-uri", keyErr)))
	}
	if v.CA.CertsDir != "" && keyErr == nil {
		files, err := authority.ReadCACerts(v.CA.CertsDir, v.CA.KeyURI)
		if err == nil {
			_, err = authority.LoadFiles(ctx, files, v.CA.KeyURI, v.Clock.Now())
		}
		errs = append(errs, inGroup("CA", setting("cacerts", err)))
	}
	if uri := v.Journal.CheckpointKeyURI; uri != "" {
		_, err := authority.OpenSigner(ctx, uri)
		errs = append(errs, inGroup("Journal", setting("checkpoint-key-uri", err)))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("controlplane: invalid configuration: %w", err)
	}
	return nil
}

// authzOn reports whether the control plane serves ext_authz: when it has
// policies to enforce, from a directory or on Kubernetes.
func (v *validated) authzOn() bool {
	return v.Listen.Authz != "off" && (v.Authz.PolicyDir != "" || v.inKube)
}

// injectorOn reports whether the control plane serves the injection
// webhook: on Kubernetes, unless turned off.
func (v *validated) injectorOn() bool { return v.inKube && v.Listen.Injector != "off" }
