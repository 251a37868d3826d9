// Package rotation rotates the CA's own certificates with overlap, in
// SPIRE's spirit: prepare, then activate.
//
// The package is split by stage, as SPIRE splits its CA manager:
//
//   - state.go and layout.go: the state file and the numbered generations
//     (gen-1, gen-2, …), each in Istio's cacerts layout, kept in a Store
//     (store.go: a directory, or one Kubernetes Secret);
//   - policy.go: the decision, a pure function of now, the state, the
//     validity of the CA in force and the Policy, saying what to do next;
//   - manager.go: the steps (prepare, stage, adopt, activate, retire) over
//     a Store, each writing new generations first and then replacing the
//     state, so that a crash leaves either the old state or the new;
//   - run.go: the small loop that applies the decision on the injected
//     clock's ticker and reloads the material in force.
//
// The policy:
//
//   - Intermediates: the next intermediate is prepared under the active root
//     at half the current one's life and activated at two thirds, or earlier
//     when that is needed to activate it at least the maximum workload TTL
//     plus the backdate (plus one check interval) before the current one
//     expires: a certificate issued just before the switch would otherwise
//     be cut short to the old intermediate's end. The trust bundle does not
//     change; chains carry intermediates.
//   - Roots: the next root (with an intermediate under it) is prepared when
//     the active root has a fifth of its life left, or earlier when that is
//     needed to activate it in time by the same rule; it enters the trust
//     bundle at once, so it reaches every agent before anything is signed
//     under it, and is activated RootPropagation later. The old root stays
//     in the bundle until every certificate signed under it has expired.
//     A due root is prepared at once unless the active intermediate would
//     not last its propagation and a fresh one would; when checks come too
//     late for that, leaves issued before the switch may be cut short, but
//     the root is never starved by intermediates cut to its end.
//
// New returns the serving control plane's Manager, which creates the first
// generation and records its policy in the state; Open returns an
// operator's Manager (trustmesh ca rotate, the bundle, audits), which never
// creates a CA and honours the times the serving control plane recorded.
package rotation
