// Package check is `trustmesh check`: a pre-flight and health check of a
// trustmesh installation, as `linkerd check` and `istioctl analyze` are for
// theirs. It reads what a control plane leaves behind and serves (the data
// directory, the journal and its witness, the policy and mesh files, the
// monitoring port) with the same code the control plane and the operator
// commands use, and says what is wrong as findings: each with a code, a
// severity and a hint.
//
// It writes nothing, and it assembles nothing: it is a reader.
package check

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// Severity is how bad a finding is. OK marks a check that passed.
type Severity int

// The severities, in order.
const (
	OK Severity = iota
	Info
	Warning
	Error
)

var severityNames = []string{"ok", "info", "warning", "error"}

func (s Severity) String() string {
	if s < OK || s > Error {
		return "severity(" + strconv.Itoa(int(s)) + ")"
	}
	return severityNames[s]
}

// MarshalText names the severity.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a severity's name.
func (s *Severity) UnmarshalText(b []byte) error {
	i := slices.Index(severityNames, string(b))
	if i < 0 {
		return fmt.Errorf("check: severity %q is not one of %s", b, strings.Join(severityNames, ", "))
	}
	*s = Severity(i)
	return nil
}

// ParseFailOn reads a --fail-on level: info, warning or error.
func ParseFailOn(s string) (Severity, error) {
	var sev Severity
	if err := sev.UnmarshalText([]byte(s)); err != nil || sev == OK {
		return 0, fmt.Errorf("check: --fail-on %q is not one of info, warning or error", s)
	}
	return sev, nil
}

// Finding is one result of a check.
type Finding struct {
	// Code names the check, e.g. TM-CA-002; it does not change with the
	// severity.
	Code     string   `json:"code"`
	Severity Severity `json:"severity"`
	// Subject is what the finding is about: a certificate, a file, a node.
	Subject string `json:"subject,omitempty"`
	Message string `json:"message"`
	// Hint says what to do; empty when nothing is to be done.
	Hint string `json:"hint,omitempty"`
}

// Report is the result of Run.
type Report struct {
	Time     time.Time `json:"time"`
	DataDir  string    `json:"data_dir"`
	Findings []Finding `json:"findings"`
	// Rotation is the rotation policy's plan, when the CA could be read.
	Rotation *rotation.Plan `json:"rotation,omitempty"`
}

// Worst is the most severe finding's severity, OK when there is none.
func (r *Report) Worst() Severity {
	w := OK
	for _, f := range r.Findings {
		w = max(w, f.Severity)
	}
	return w
}

// Count returns how many findings are at severity s.
func (r *Report) Count(s Severity) int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == s {
			n++
		}
	}
	return n
}

func (r *Report) add(code string, sev Severity, subject, hint, format string, args ...any) {
	r.Findings = append(r.Findings, Finding{Code: code, Severity: sev, Subject: subject, Message: fmt.Sprintf(format, args...), Hint: hint})
}

// Defaults of Config.
const (
	DefaultMinValidity      = 30 * 24 * time.Hour
	DefaultMaxCheckpointAge = 24 * time.Hour
	DefaultStaleAfter       = 5 * time.Minute
	DefaultTimeout          = 5 * time.Second
)

// Config says what to check.
type Config struct {
	// DataDir and Journal name the CA's data directory and journal as the
	// operator commands take them (Journal.CASecret reads the CA from the
	// Secret serve --ca-secret keeps it in).
	DataDir admin.DataDir
	Journal admin.JournalOptions
	// MinValidity is how long the active root and intermediate must still
	// be valid; shorter is a warning, expired an error.
	MinValidity time.Duration
	// MaxCheckpointAge is how old the journal's last checkpoint may be.
	// Every issuance signs one, so an old one means nothing was issued.
	MaxCheckpointAge time.Duration
	// Witness is serve's --witness: a file or an http(s) URL. Empty skips
	// the witness checks.
	Witness string
	// WitnessKey is serve's --witness-key: the cosignature/v1 verifier key
	// of a URL witness (a C2SP tlog-witness), required with one. Check
	// verifies with it the cosigned checkpoint serve keeps in DataDir.
	WitnessKey string
	// Policies is an AuthorizationPolicy directory and Bundles the Rego
	// bundles serve loads with it (--bundle, and those the directory's
	// bundles file names); RootNamespace is serve's. Empty skips.
	Policies      string
	Bundles       source.Bundles
	RootNamespace string
	// Mesh is a mesh directory. Empty skips.
	Mesh string
	// Monitoring is the control plane's monitoring address (host:port):
	// /readyz and the xDS clients endpoint are asked there. Empty skips.
	Monitoring string
	// StaleAfter is how long a connected xDS client may leave a version
	// unacknowledged before it is stale.
	StaleAfter time.Duration
	// Timeout bounds each network request.
	Timeout time.Duration
	// HTTP is the client for the monitoring port; nil means a plain client
	// with Timeout.
	HTTP *http.Client
	// Now is the time the CA and the journal are judged at.
	Now time.Time
}

func (c Config) withDefaults() Config {
	if c.MinValidity == 0 {
		c.MinValidity = DefaultMinValidity
	}
	if c.MaxCheckpointAge == 0 {
		c.MaxCheckpointAge = DefaultMaxCheckpointAge
	}
	if c.StaleAfter == 0 {
		c.StaleAfter = DefaultStaleAfter
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.HTTP == nil {
		c.HTTP = &http.Client{Timeout: c.Timeout}
	}
	return c
}

// Validate checks the configuration, collecting every error.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("check: --data-dir is required"))
	}
	if c.Now.IsZero() {
		errs = append(errs, errors.New("check: the time to check at is required"))
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"--min-validity", c.MinValidity}, {"--max-checkpoint-age", c.MaxCheckpointAge}, {"--stale-after", c.StaleAfter}, {"--timeout", c.Timeout}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("check: %s %s must not be negative", d.flag, d.v))
		}
	}
	switch {
	case c.WitnessKey != "" && !journal.IsURL(c.Witness):
		errs = append(errs, errors.New("check: --witness-key is the key of a URL --witness (a tlog-witness); a file witness has none"))
	case c.WitnessKey != "":
		if _, _, _, err := journal.ParseCosignatureKey(c.WitnessKey); err != nil {
			errs = append(errs, fmt.Errorf("check: --witness-key: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Run runs every check cfg asks for and returns the findings. Its error is
// for a configuration that cannot be checked at all; everything found
// wrong with the installation is a finding.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	r := &Report{Time: cfg.Now, DataDir: string(cfg.DataDir), Findings: []Finding{}}
	checkCA(ctx, cfg, r)
	td := checkJournal(ctx, cfg, r)
	checkPolicies(ctx, cfg, r)
	checkMesh(cfg, td, r)
	checkReady(ctx, cfg, r)
	checkXDS(ctx, cfg, r)
	return r, nil
}

// ParseDuration reads a duration as time.ParseDuration does, with whole
// days too: "30d", "1d12h", "36h".
func ParseDuration(s string) (time.Duration, error) {
	var d time.Duration
	rest := s
	if i := strings.IndexByte(s, 'd'); i > 0 {
		n, err := strconv.Atoi(s[:i])
		if err != nil || n < 0 {
			return 0, fmt.Errorf("duration %q: want e.g. 30d, 1d12h or 36h", s)
		}
		d, rest = time.Duration(n)*24*time.Hour, s[i+1:]
	}
	if rest != "" {
		r, err := time.ParseDuration(rest)
		if err != nil {
			return 0, fmt.Errorf("duration %q: want e.g. 30d, 1d12h or 36h", s)
		}
		d += r
	}
	return d, nil
}
