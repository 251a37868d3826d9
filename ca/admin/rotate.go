package admin

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/internal/serial"
)

// TrustBundle reads the trust bundle of the data directory's CA, or of
// operator-supplied material in cacertsDir.
func TrustBundle(ctx context.Context, dir DataDir, o JournalOptions, cacertsDir string) (*spiffebundle.Bundle, error) {
	store, td, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	store.Close()
	if _, err := os.Stat(filepath.Join(dir.CADir(), "rotation.json")); o.CASecret == "" && cacertsDir != "" && err != nil {
		roots, err := pemutil.ReadCertificateBundle(filepath.Join(cacertsDir, authority.RootCertFile))
		if err != nil {
			return nil, fmt.Errorf("admin: read trust bundle: %w", err)
		}
		return spiffebundle.FromX509Authorities(td, roots), nil
	}
	mgr, err := dir.rotationManager(td, nil, o)
	if err != nil {
		return nil, err
	}
	mat, _, err := mgr.Certificates(ctx, time.Now())
	if err != nil {
		return nil, err
	}
	return spiffebundle.FromX509Authorities(td, mat.Roots), nil
}

// rotationManager reads and writes the CA where serve keeps it: the Secret
// named by o.CASecret, or else the data directory. It never creates a CA.
func (d DataDir) rotationManager(td spiffeid.TrustDomain, rec rotation.Recorder, o JournalOptions) (*rotation.Manager, error) {
	cfg := rotation.Config{Dir: d.CADir(), TrustDomain: td, Recorder: rec}
	if o.CASecret != "" {
		ns, name, ok := strings.Cut(o.CASecret, "/")
		if !ok || ns == "" || name == "" {
			return nil, fmt.Errorf("admin: CA secret %q is not namespace/name", o.CASecret)
		}
		client, err := o.kube()
		if err != nil {
			return nil, err
		}
		cfg.Store = rotation.SecretStore{Client: client, Namespace: ns, Name: name}
	}
	return rotation.Open(cfg)
}

// RotationStatus is what `trustmesh ca rotate --status` shows: the rotation
// state as of At, with times in RFC 3339 and durations as Go duration
// strings ("72h0m0s") in JSON.
type RotationStatus struct {
	At time.Time `json:"at"`
	// Active is the generation that signs; Next the prepared one, 0 when
	// none.
	Active     int       `json:"active"`
	Next       int       `json:"next,omitempty"`
	NextIsRoot bool      `json:"next_is_root,omitempty"`
	PreparedAt time.Time `json:"prepared_at,omitzero"`
	// ActivatableAt is when a prepared root has sat in the trust bundle for
	// RootPropagation and may sign; zero when nothing prepared waits.
	ActivatableAt   time.Time `json:"activatable_at,omitzero"`
	ActivatedAt     time.Time `json:"activated_at,omitzero"`
	RetireAfter     Duration  `json:"retire_after,omitzero"`
	RootPropagation Duration  `json:"root_propagation,omitzero"`
	// Retiring are replaced roots kept in the bundle until their time.
	Retiring []RetiringRoot `json:"retiring,omitempty"`
	// Tainted are CA certificates marked compromised, kept in the bundle
	// (marked) until the journal shows no valid leaf under them.
	Tainted []TaintedCA    `json:"tainted,omitempty"`
	CA      []audit.CACert `json:"ca"`
}

// RetiringRoot is a replaced root that stays trusted until Until.
type RetiringRoot struct {
	Subject string    `json:"subject"`
	Serial  string    `json:"serial"`
	Until   time.Time `json:"until"`
}

// TaintedCA is a CA certificate marked compromised by ca rotate --taint.
type TaintedCA struct {
	Role    string    `json:"role"`
	Subject string    `json:"subject"`
	Serial  string    `json:"serial"`
	At      time.Time `json:"tainted_at"`
}

// Duration marshals as a Go duration string ("72h0m0s"), not nanoseconds.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("admin: duration: %w", err)
	}
	*d = Duration(v)
	return nil
}

// RotateRequest is one step of CA rotation driven by hand.
type RotateRequest struct {
	// Step is "prepare", "activate", "taint" or "status".
	Step string
	// Taint, with taint, is what is compromised: "intermediate" (the
	// default) or "root".
	Taint string
	// Root, with prepare, rotates the root too.
	Root bool
	// CACertsDir, with prepare, stages that operator-supplied material
	// instead (its key at KeyURI, or the directory's ca-key.pem, referenced
	// in place).
	CACertsDir, KeyURI string
	// Force activates a new root before its propagation time.
	Force bool
	// CASecret ("namespace/name") is where serve keeps the CA with
	// --ca-secret; the rotation state is read and written there.
	CASecret   string
	Kubeconfig string
}

// Rotate drives CA rotation by hand. A running serve picks the change up at
// its next rotation check.
func Rotate(ctx context.Context, dir DataDir, o JournalOptions, req RotateRequest) (*RotationStatus, error) {
	store, td, err := dir.openExisting(ctx, o, req.Step == "status")
	if err != nil {
		return nil, err
	}
	defer store.Close()
	if req.CASecret != "" {
		o.CASecret = req.CASecret
	}
	if o.Kubeconfig == "" {
		o.Kubeconfig = req.Kubeconfig
	}
	mgr, err := dir.rotationManager(td, store, o)
	if err != nil {
		return nil, err
	}
	switch req.Step {
	case "prepare":
		if req.CACertsDir != "" {
			err = mgr.Stage(ctx, req.CACertsDir, req.KeyURI)
		} else {
			err = mgr.Prepare(ctx, req.Root)
		}
	case "activate":
		err = mgr.Activate(ctx, req.Force)
	case "taint":
		switch req.Taint {
		case "", rotation.RoleIntermediate:
			_, err = mgr.Taint(ctx, false)
		case rotation.RoleRoot:
			_, err = mgr.Taint(ctx, true)
		default:
			err = fmt.Errorf("admin: --taint %q: want intermediate or root", req.Taint)
		}
	case "status":
	default:
		err = fmt.Errorf("admin: unknown rotation step %q", req.Step)
	}
	if err != nil {
		return nil, err
	}
	return rotationStatus(ctx, mgr, time.Now())
}

func rotationStatus(ctx context.Context, mgr *rotation.Manager, now time.Time) (*RotationStatus, error) {
	mat, st, err := mgr.Certificates(ctx, now)
	if err != nil {
		return nil, err
	}
	rs := &RotationStatus{
		At: now.UTC(), Active: st.Active, Next: st.Next, NextIsRoot: st.NextIsRoot,
		PreparedAt: st.PreparedAt, ActivatedAt: st.ActivatedAt,
		RetireAfter: Duration(st.RetireAfter), RootPropagation: Duration(st.RootPropagation),
		CA: CACerts(mat, st),
	}
	if st.Next != 0 && st.NextIsRoot && !st.PreparedAt.IsZero() && st.RootPropagation > 0 {
		rs.ActivatableAt = st.PreparedAt.Add(st.RootPropagation)
	}
	for _, r := range st.Retiring {
		rr := RetiringRoot{Until: r.Until}
		if c, err := pemutil.ParseCertificate([]byte(r.CertPEM)); err == nil {
			rr.Subject, rr.Serial = c.Subject.CommonName, serial.Format(c.SerialNumber)
		}
		rs.Retiring = append(rs.Retiring, rr)
	}
	for _, t := range st.Tainted {
		tc := TaintedCA{Role: t.Role, At: t.At}
		if c, err := t.Cert(); err == nil {
			tc.Subject, tc.Serial = c.Subject.CommonName, serial.Format(c.SerialNumber)
		}
		rs.Tainted = append(rs.Tainted, tc)
	}
	return rs, nil
}

// CACerts describes the CA certificates in force for audits.
func CACerts(mat *authority.Material, st rotation.State) []audit.CACert {
	var out []audit.CACert
	for _, c := range mat.Chain {
		out = append(out, audit.CACert{Role: "intermediate", Subject: c.Subject.CommonName, Serial: serial.Format(c.SerialNumber), NotAfter: c.NotAfter, State: "active"})
	}
	for _, r := range mat.Roots {
		state := "trusted"
		switch {
		case mat.Anchor != nil && r.Equal(mat.Anchor):
			state = "active"
		case isTainted(r, st):
			state = "tainted"
		case st.Next != 0 && st.NextIsRoot && !isRetiring(r, st):
			state = "prepared"
		case isRetiring(r, st):
			state = "retiring"
		}
		out = append(out, audit.CACert{Role: "root", Subject: r.Subject.CommonName, Serial: serial.Format(r.SerialNumber), NotAfter: r.NotAfter, State: state})
	}
	return out
}

func isTainted(c *x509.Certificate, st rotation.State) bool {
	for _, t := range st.Tainted {
		if tc, err := t.Cert(); err == nil && tc.Equal(c) {
			return true
		}
	}
	return false
}

func isRetiring(c *x509.Certificate, st rotation.State) bool {
	for _, r := range st.Retiring {
		if rc, err := pemutil.ParseCertificate([]byte(r.CertPEM)); err == nil && rc.Equal(c) {
			return true
		}
	}
	return false
}
