package journal

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// WitnessCosignedFile is where serve keeps, in its data directory, the
// latest checkpoint its tlog-witness cosigned (ExportConfig.Cosigned).
const WitnessCosignedFile = "witness-cosigned.checkpoint"

// AddCheckpointPath is the C2SP tlog-witness endpoint, under the witness's
// submission prefix.
const AddCheckpointPath = "/add-checkpoint"

// Why an export to a tlog-witness failed (WitnessError.Reason, the reason
// label of trustmesh_journal_witness_failures_total).
const (
	// ReasonUnreachable: the witness could not be reached, or answered 5xx.
	ReasonUnreachable = "unreachable"
	// ReasonInconsistent: the witness refused our consistency proof (422),
	// or has cosigned a larger tree than this log now holds. Either this
	// journal was rewritten or cut after the witness saw it, or the witness
	// follows another log of the same name: treat it as an incident.
	ReasonInconsistent = "inconsistent"
	// ReasonRefused: the witness refused the checkpoint as not signed by a
	// key it knows for our origin, or for an origin it does not know
	// (403, 404): a configuration mismatch.
	ReasonRefused = "refused"
	// ReasonBadCosignature: the witness accepted, but its cosignature does
	// not verify with the configured witness key.
	ReasonBadCosignature = "bad-cosignature"
	// ReasonProtocol: any other answer (400, a 409 that does not settle, a
	// malformed body), or no proof could be made here.
	ReasonProtocol = "protocol"
)

// WitnessError is a failed export to a tlog-witness.
type WitnessError struct {
	Reason string
	// Status is the witness's HTTP status, 0 when none came.
	Status int
	Err    error
}

func (e *WitnessError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("journal: witness (%s, HTTP %d): %v", e.Reason, e.Status, e.Err)
	}
	return fmt.Sprintf("journal: witness (%s): %v", e.Reason, e.Err)
}

func (e *WitnessError) Unwrap() error { return e.Err }

func failureReason(err error) string {
	var we *WitnessError
	if errors.As(err, &we) {
		return we.Reason
	}
	return ReasonUnreachable
}

// maxWitnessAnswer bounds what is read of a witness's answer: a few
// signature lines.
const maxWitnessAnswer = 64 << 10

// maxConflicts bounds the 409 round trips of one export: the witness's
// size changes only when someone else pushes the same log to it.
const maxConflicts = 3

// addCheckpoint pushes signed to the tlog-witness: "old N", the proof from
// N, an empty line, the checkpoint. N starts at the size the witness last
// cosigned for us (0 at first); a 409 tells the witness's size, and the
// request is made again with a proof from there.
func (w *ExportWitness) addCheckpoint(ctx context.Context, signed []byte) error {
	cp, err := parseUnverified(signed)
	if err != nil {
		return &WitnessError{Reason: ReasonProtocol, Err: err}
	}
	endpoint, err := addCheckpointURL(w.cfg.Target)
	if err != nil {
		return &WitnessError{Reason: ReasonProtocol, Err: err}
	}
	w.mu.Lock()
	old, prover := w.witnessSize, w.prover
	w.mu.Unlock()
	for range maxConflicts {
		if old > cp.Size {
			// The witness holds a larger tree than this checkpoint. Either a
			// newer checkpoint got there first (another replica's, on a
			// shared journal), and this one is merely stale, or the journal
			// was cut after the witness saw it. Only the journal can tell.
			if prover != nil {
				if _, perr := prover.ConsistencyBetween(ctx, cp.Size, old); perr == nil {
					return nil // stale: the next checkpoint carries a proof from the witness's size
				}
			}
			return &WitnessError{Reason: ReasonInconsistent, Err: fmt.Errorf("the witness has cosigned size %d of %s, larger than this journal's %d: the journal was cut or rolled back after the witness saw it", old, cp.Origin, cp.Size)}
		}
		proof := [][]byte{}
		if old > 0 && old < cp.Size {
			if prover == nil {
				return &WitnessError{Reason: ReasonProtocol, Err: errors.New("no consistency prover (SetProver)")}
			}
			if proof, err = prover.ConsistencyBetween(ctx, old, cp.Size); err != nil {
				return &WitnessError{Reason: ReasonProtocol, Err: fmt.Errorf("consistency proof from %d to %d: %w", old, cp.Size, err)}
			}
		}
		status, body, err := w.post(ctx, endpoint, AddCheckpointBody(old, proof, signed))
		if err != nil {
			return err
		}
		switch {
		case status == http.StatusOK:
			return w.accepted(cp, signed, body)
		case status == http.StatusConflict:
			latest, perr := strconv.ParseUint(strings.TrimSpace(string(body)), 10, 64)
			if perr != nil || latest == old {
				return &WitnessError{Reason: ReasonProtocol, Status: status, Err: fmt.Errorf("a conflict that names no new size: %q", firstLine(body))}
			}
			// An unauthenticated answer: used for this export only, never
			// kept, so that one forged 409 cannot poison later exports.
			old = latest
		case status == http.StatusUnprocessableEntity:
			return &WitnessError{Reason: ReasonInconsistent, Status: status, Err: fmt.Errorf("the witness refused the consistency proof from size %d to %d: this journal does not extend the tree the witness cosigned: %s", old, cp.Size, firstLine(body))}
		case status == http.StatusForbidden || status == http.StatusNotFound:
			return &WitnessError{Reason: ReasonRefused, Status: status, Err: fmt.Errorf("the witness does not take checkpoints of %s signed with this journal's key (add the log and its checkpoint key to the witness): %s", cp.Origin, firstLine(body))}
		case status/100 == 5:
			return &WitnessError{Reason: ReasonUnreachable, Status: status, Err: errors.New(firstLine(body))}
		default:
			return &WitnessError{Reason: ReasonProtocol, Status: status, Err: errors.New(firstLine(body))}
		}
	}
	return &WitnessError{Reason: ReasonProtocol, Status: http.StatusConflict, Err: fmt.Errorf("the witness's size kept changing over %d attempts", maxConflicts)}
}

// accepted verifies the witness's cosignature and keeps the cosigned
// checkpoint.
func (w *ExportWitness) accepted(cp Checkpoint, signed, body []byte) error {
	if w.cfg.Key == "" {
		w.mu.Lock()
		w.witnessSize = cp.Size
		w.mu.Unlock()
		return nil
	}
	var line []byte
	var at time.Time
	var lastErr error = fmt.Errorf("%w: the witness answered no signature line", ErrCosignature)
	for _, l := range bytes.SplitAfter(body, []byte("\n")) {
		if len(bytes.TrimSpace(l)) == 0 {
			continue
		}
		t, err := VerifyCosignature(w.cfg.Key, cp, l)
		if err != nil {
			lastErr = err
			continue
		}
		line, at = l, t
		break
	}
	if line == nil {
		return &WitnessError{Reason: ReasonBadCosignature, Status: http.StatusOK, Err: lastErr}
	}
	if !bytes.HasSuffix(line, []byte("\n")) {
		line = append(line, '\n')
	}
	if w.cfg.Cosigned != "" {
		cosigned := append(append([]byte{}, signed...), line...)
		if err := atomicfile.WriteFile(w.cfg.Cosigned, cosigned, 0o644); err != nil {
			return fmt.Errorf("journal: keeping the witness's cosignature: %w", err)
		}
	}
	w.mu.Lock()
	w.witnessSize = cp.Size
	w.status.Cosigned, w.status.CosignedAt = cp.Size, at
	w.mu.Unlock()
	return nil
}

func (w *ExportWitness) post(ctx context.Context, endpoint string, body []byte) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		// url.Parse's error quotes the URL it refused.
		return 0, nil, &WitnessError{Reason: ReasonProtocol, Err: fmt.Errorf("%s: the URL does not parse", RedactTarget(w.cfg.Target))}
	}
	req.Header.Set("Content-Type", "text/plain; charset=utf-8")
	resp, err := w.client.Do(req)
	if err != nil {
		// The client's *url.Error quotes the URL with its query (and
		// masks only a password): name the redacted target instead.
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = RedactTarget(w.cfg.Target)
		}
		return 0, nil, &WitnessError{Reason: ReasonUnreachable, Err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxWitnessAnswer))
	if err != nil {
		return 0, nil, &WitnessError{Reason: ReasonUnreachable, Status: resp.StatusCode, Err: err}
	}
	return resp.StatusCode, b, nil
}

// addCheckpointURL appends the endpoint to the submission prefix, keeping
// the URL's user information and query.
func addCheckpointURL(target string) (string, error) {
	u, err := url.Parse(target)
	if err != nil {
		return "", fmt.Errorf("%s: the URL does not parse", RedactTarget(target))
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + AddCheckpointPath
	u.RawPath = ""
	return u.String(), nil
}

func firstLine(b []byte) string {
	line, _, _ := bytes.Cut(bytes.TrimSpace(b), []byte("\n"))
	if len(line) > 200 {
		line = line[:200]
	}
	return strconv.Quote(string(line))
}

// parseUnverified reads a signed checkpoint's body without checking its
// signature: the export only forwards what the journal signed.
func parseUnverified(signed []byte) (Checkpoint, error) {
	text, _, ok := bytes.Cut(signed, []byte("\n\n"))
	if !ok {
		return Checkpoint{}, errors.New("journal: not a signed checkpoint")
	}
	origin, _, _ := strings.Cut(string(text), "\n")
	return parseCheckpointText(string(text)+"\n", origin)
}

// AddCheckpointBody builds a tlog-witness add-checkpoint request body.
func AddCheckpointBody(old uint64, proof [][]byte, signed []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "old %d\n", old)
	for _, h := range proof {
		b.WriteString(base64.StdEncoding.EncodeToString(h))
		b.WriteByte('\n')
	}
	b.WriteByte('\n')
	b.Write(signed)
	return b.Bytes()
}

var (
	witnessFailuresDesc = prometheus.NewDesc("trustmesh_journal_witness_failures_total",
		"Checkpoint exports to the witness that failed, by reason (inconsistent: the witness says this journal does not extend what it cosigned).", []string{"reason"}, nil)
	witnessCosignedDesc = prometheus.NewDesc("trustmesh_journal_witness_cosigned_size",
		"Size of the latest journal checkpoint whose witness cosignature verified.", nil, nil)
	witnessCosignedTimeDesc = prometheus.NewDesc("trustmesh_journal_witness_cosigned_timestamp_seconds",
		"Time in the latest verified witness cosignature (alert when it stops advancing while issuance goes on).", nil, nil)
)

var _ prometheus.Collector = (*ExportWitness)(nil)

// Describe implements prometheus.Collector.
func (w *ExportWitness) Describe(ch chan<- *prometheus.Desc) {
	ch <- witnessFailuresDesc
	ch <- witnessCosignedDesc
	ch <- witnessCosignedTimeDesc
}

// Collect implements prometheus.Collector.
func (w *ExportWitness) Collect(ch chan<- prometheus.Metric) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range []string{ReasonUnreachable, ReasonInconsistent, ReasonRefused, ReasonBadCosignature, ReasonProtocol} {
		ch <- prometheus.MustNewConstMetric(witnessFailuresDesc, prometheus.CounterValue, float64(w.failures[r]), r)
	}
	ch <- prometheus.MustNewConstMetric(witnessCosignedDesc, prometheus.GaugeValue, float64(w.status.Cosigned))
	var ts float64
	if !w.status.CosignedAt.IsZero() {
		ts = float64(w.status.CosignedAt.Unix())
	}
	ch <- prometheus.MustNewConstMetric(witnessCosignedTimeDesc, prometheus.GaugeValue, ts)
}
