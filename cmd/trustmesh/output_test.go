package main

import (
	"bytes"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"
)

// runFail runs trustmesh expecting it to fail, and returns its stdout and
// stderr.
func runFail(t *testing.T, args ...string) (string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err == nil {
		t.Fatalf("trustmesh %s succeeded:\n%s", strings.Join(args, " "), stdout.String())
	}
	return stdout.String(), stderr.String()
}

// TestOperatorCommandsOnServedCA runs the operator commands against a
// served CA: every -o takes table, json and yaml and refuses anything else;
// yaml has the JSON field names; tables are human-readable and JSON carries
// RFC 3339 times and Go durations; audit prove takes the serial the way
// openssl prints it; a refused revocation and a missing data directory
// leave nothing behind.
func TestOperatorCommandsOnServedCA(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	id := spiffeid.RequireFromString("spiffe://cluster.local/vm/output")
	srv := startServe(t, dataDir)
	_, _, roots := bundleOf(t, dataDir)
	token := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String()))
	leaf := issue(t, srv.ca, roots, token)[0]

	// -o: three formats, one set of field names, nothing else.
	for _, args := range [][]string{
		{"audit", "log"}, {"audit", "verify"}, {"audit", "rotation", "--fail-on", "critical"}, {"ca", "rotate", "--status"},
	} {
		name := strings.Join(args, " ")
		base := append(args, "--data-dir", dataDir)
		js := run(t, append(base, "-o", "json")...)
		ym := run(t, append(base, "-o", "yaml")...)
		var fromJSON, fromYAML any
		if err := json.Unmarshal([]byte(js), &fromJSON); err != nil {
			t.Fatalf("%s -o json: %v", name, err)
		}
		if err := yaml.Unmarshal([]byte(ym), &fromYAML); err != nil || strings.HasPrefix(strings.TrimSpace(ym), "{") {
			t.Fatalf("%s -o yaml printed %q (%v); want YAML", name, ym, err)
		}
		if a, b := keys(fromJSON), keys(fromYAML); !slices.Equal(a, b) {
			t.Errorf("%s: yaml fields %v, json fields %v", name, b, a)
		}
		table := run(t, base...)
		if table == js || table == ym {
			t.Errorf("%s: the default output is not a table", name)
		}
		checkTable(t, name, table)
		out, stderr := runFail(t, append(base, "-o", "xml")...)
		if out != "" || !strings.Contains(stderr, `"xml"`) || !strings.Contains(stderr, "table, json or yaml") {
			t.Errorf("%s -o xml: stdout %q, stderr %q; want a refusal that lists table, json and yaml", name, out, stderr)
		}
	}

	// JSON: RFC 3339 times and Go duration strings.
	var st map[string]any
	if err := json.Unmarshal([]byte(run(t, "ca", "rotate", "--status", "--data-dir", dataDir, "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if _, err := time.Parse(time.RFC3339, fmt.Sprint(st["at"])); err != nil {
		t.Errorf("ca rotate --status at = %v: %v", st["at"], err)
	}
	durations := 0
	for _, k := range []string{"retire_after", "root_propagation"} {
		if v, ok := st[k]; ok {
			s, isString := v.(string)
			if _, err := time.ParseDuration(s); !isString || err != nil {
				t.Errorf("ca rotate --status %s = %v; want a Go duration string", k, v)
			}
			durations++
		}
	}
	if durations == 0 {
		t.Errorf("ca rotate --status -o json shows no durations: %v", st)
	}

	// Serials: the journal's spelling, and openssl's.
	var rows []map[string]any
	if err := json.Unmarshal([]byte(run(t, "audit", "log", "--data-dir", dataDir, "-o", "json")), &rows); err != nil {
		t.Fatal(err)
	}
	journalSerial := ""
	for _, r := range rows {
		if r["kind"] == "issuance" {
			journalSerial = fmt.Sprint(r["serial"])
		}
	}
	if journalSerial != leaf.SerialNumber.Text(16) {
		t.Fatalf("the journal spells the serial %q; want lowercase hex %q", journalSerial, leaf.SerialNumber.Text(16))
	}
	forms := []string{journalSerial, strings.ToUpper(journalSerial), "0x" + journalSerial, "00" + journalSerial, opensslStyle(leaf.SerialNumber.Bytes())}
	if openssl, err := exec.LookPath("openssl"); err == nil {
		certFile := filepath.Join(t.TempDir(), "leaf.pem")
		if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(openssl, "x509", "-in", certFile, "-serial", "-noout").Output()
		if err != nil {
			t.Fatal(err)
		}
		line := strings.TrimSpace(string(out))
		forms = append(forms, strings.TrimPrefix(line, "serial="), line)
	} else {
		t.Log("openssl is not installed; checking the exact forms it prints")
	}
	want := run(t, "audit", "prove", "--data-dir", dataDir, "--serial", journalSerial)
	for _, f := range forms {
		if got := run(t, "audit", "prove", "--data-dir", dataDir, "--serial", f); got != want {
			t.Errorf("audit prove --serial %q gave another proof", f)
		}
	}

	// A refused revocation writes nothing.
	count := len(rows)
	if _, stderr := runFail(t, "ca", "revoke", "--data-dir", dataDir, "--spiffe-id", "spiffe://cluster.local/vm/never"); !strings.Contains(stderr, "nothing was written") {
		t.Errorf("ca revoke of a never-enrolled identity said %q", stderr)
	}
	if err := json.Unmarshal([]byte(run(t, "audit", "log", "--data-dir", dataDir, "-o", "json")), &rows); err != nil || len(rows) != count {
		t.Errorf("after a refused revocation the journal has %d entries (%v); want %d", len(rows), err, count)
	}

	// An operator command on a missing data directory creates nothing.
	missing := filepath.Join(t.TempDir(), "missing")
	_, stderr := runFail(t, "ca", "token", "create", "--data-dir", missing, "--spiffe-id", id.String())
	if !strings.Contains(stderr, "no trustmesh data directory at "+missing) || !strings.Contains(stderr, "trustmesh serve --data-dir "+missing) {
		t.Errorf("ca token create on a missing data directory said %q", stderr)
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ca token create made %s (%v)", missing, err)
	}
}

// opensslStyle spells a serial as `openssl x509 -serial` does: uppercase
// hex bytes, with a leading zero byte kept.
func opensslStyle(b []byte) string {
	if len(b) > 0 && b[0]&0x80 != 0 {
		b = append([]byte{0}, b...)
	}
	return fmt.Sprintf("serial=%X", b)
}

// keys lists the field names of a JSON value, its first element's for an
// array.
func keys(v any) []string {
	if a, ok := v.([]any); ok && len(a) > 0 {
		v = a[0]
	}
	m, _ := v.(map[string]any)
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

var (
	rfc3339InTable = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d`)
	// caSubject is the CA certificates' common name, which carries the
	// time it was made as RFC 3339: data, not the table's spelling.
	caSubject   = regexp.MustCompile(`trustmesh (root|intermediate) \S+ \S+Z`)
	nanoseconds = regexp.MustCompile(`\b\d{10,}\b`)
	goDuration  = regexp.MustCompile(`\b\d+h\d+m\d+s\b`)
)

// checkTable: a table shows times as "2026-12-05 15:30 UTC" and durations
// as "3d4h", never RFC 3339, nanoseconds or "72h0m0s".
func checkTable(t *testing.T, name, table string) {
	t.Helper()
	table = caSubject.ReplaceAllString(table, "SUBJECT")
	for what, re := range map[string]*regexp.Regexp{"an RFC 3339 time": rfc3339InTable, "nanoseconds": nanoseconds, "a Go duration": goDuration} {
		if m := re.FindString(table); m != "" {
			t.Errorf("%s table shows %s (%q):\n%s", name, what, m, table)
		}
	}
	if !strings.Contains(table, " UTC") && name != "audit verify" {
		t.Errorf("%s table shows no time:\n%s", name, table)
	}
}
