package controlplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/internal/dirlock"
	"github.com/trustmesh/trustmesh/mesh"
)

// Check is `serve --validate`: every check a start makes short of serving.
// It checks the settings and reads what they name: the policies parse and
// compile with their bundles, the mesh directory and the injector's mesh
// config parse, operator-supplied CA material loads, and the CA and
// checkpoint key URIs open with the KMS back ends this binary has. It binds
// every port (and ext_authz's unix socket) and releases it at once, and
// looks at an existing data directory as a start would: it must be a
// directory no running serve holds, and its journal must be of this trust
// domain. It reports every problem, and writes nothing.
func Check(ctx context.Context, cfg Config) error {
	v, errs := cfg.settings()
	if errors.Join(errs...) == nil {
		// Ports are bound only for settings that check out; a bad one
		// is reported once, by the settings.
		errs = append(errs, inGroup("Listen", v.checkPorts()...))
	}
	errs = append(errs, v.inputs(ctx)...)
	errs = append(errs, v.checkDataDir(ctx))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("controlplane: invalid configuration: %w", err)
	}
	return nil
}

// checkDataDir checks an existing data directory as a start would, without
// creating or writing anything in it: it is a directory, no running serve
// holds it, and its journal, if it keeps one, is of this trust domain. A
// missing data directory is fine: the start creates it.
func (v *validated) checkDataDir(ctx context.Context) error {
	exists, err := dataDirExists(v.DataDir)
	if err != nil || !exists {
		return err
	}
	if err := dirlock.Probe(v.DataDir, dataDirLock); err != nil {
		var held *dirlock.HeldError
		if errors.As(err, &held) {
			return setting("data-dir", fmt.Errorf("%w; stop it, or give this serve another --data-dir", err))
		}
		return setting("data-dir", err)
	}
	if v.Journal.DSN != "" || v.td.IsZero() {
		// Opening a shared journal may create its schema: the start
		// checks its trust domain.
		return nil
	}
	store, td, err := admin.DataDir(v.DataDir).OpenExisting(ctx, admin.JournalOptions{Log: v.Log})
	switch {
	case errors.Is(err, admin.ErrNoDataDir):
		return nil // no journal yet: the start creates it
	case err != nil:
		return setting("data-dir", err)
	}
	_ = store.Close()
	if td != v.td {
		return setting("trust-domain", fmt.Errorf("%q: the journal in %s belongs to trust domain %q", v.td.Name(), v.DataDir, td.Name()))
	}
	return nil
}

// checkInputs reads every input the configuration names, as a start would,
// and reports all that fail. New runs it before it creates anything.
func (v *validated) checkInputs(ctx context.Context) error {
	if err := errors.Join(v.inputs(ctx)...); err != nil {
		return fmt.Errorf("controlplane: invalid configuration: %w", err)
	}
	return nil
}

// inputs reads every input the configuration names, and returns every
// problem.
func (v *validated) inputs(ctx context.Context) []error {
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
	if v.uiOn() {
		_, _, uiErrs := v.UI.inputs(v.inKube)
		errs = append(errs, inGroup("UI", uiErrs...))
	}
	if uri := v.Journal.CheckpointKeyURI; uri != "" {
		_, err := authority.OpenSigner(ctx, uri)
		errs = append(errs, inGroup("Journal", setting("checkpoint-key-uri", err)))
	}
	return errs
}

// authzOn reports whether the control plane serves ext_authz: when it has
// policies to enforce, from a directory or on Kubernetes.
func (v *validated) authzOn() bool {
	return v.Listen.Authz != "off" && (v.Authz.PolicyDir != "" || v.inKube)
}

// injectorOn reports whether the control plane serves the admission
// webhooks (injection, validation): on Kubernetes, unless turned off.
func (v *validated) injectorOn() bool { return v.inKube && v.Listen.Injector != "off" }
