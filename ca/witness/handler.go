package witness

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// AddCheckpointPath is the C2SP tlog-witness endpoint.
const AddCheckpointPath = journal.AddCheckpointPath

// Handler serves the C2SP tlog-witness add-checkpoint API: a POST whose
// body is "old N", the consistency proof from N (one base64 hash a line),
// an empty line and the signed checkpoint. It answers 200 with the
// cosignature line; 400 when the checkpoint is smaller than N or the
// request does not parse; 409 with the latest accepted size
// (text/x.tlog.size) when N is not it; 403 when the log's key did not sign
// it; 404 for an unknown log; 422 when the proof does not verify, or the
// checkpoint is another tree of the accepted size (its empty proof fails).
func Handler(w *Witness) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+AddCheckpointPath, func(rw http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxResponse))
		if err != nil {
			http.Error(rw, "reading the request", http.StatusBadRequest)
			return
		}
		old, proof, signed, err := parseAddCheckpoint(body)
		if err != nil {
			http.Error(rw, err.Error(), http.StatusBadRequest)
			return
		}
		cosig, err := w.Add(signed, old, proof)
		var conflict *ConflictError
		var refused *RefusedError
		switch {
		case err == nil:
			rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
			_, _ = rw.Write(cosig)
		case errors.As(err, &conflict):
			writeSize(rw, conflict.Latest)
		case errors.As(err, &refused) && refused.Kind == KindRollback:
			http.Error(rw, refused.Error(), http.StatusBadRequest)
		case errors.As(err, &refused):
			http.Error(rw, refused.Error(), http.StatusUnprocessableEntity)
		case errors.Is(err, ErrUnknownLog):
			http.Error(rw, err.Error(), http.StatusNotFound)
		case errors.Is(err, ErrBadSignature):
			http.Error(rw, err.Error(), http.StatusForbidden)
		case errors.Is(err, ErrMalformed):
			http.Error(rw, err.Error(), http.StatusBadRequest)
		default:
			http.Error(rw, "the witness could not record the checkpoint", http.StatusInternalServerError)
		}
	})
	return mux
}

func writeSize(rw http.ResponseWriter, size uint64) {
	rw.Header().Set("Content-Type", "text/x.tlog.size")
	rw.WriteHeader(http.StatusConflict)
	_, _ = fmt.Fprintf(rw, "%d\n", size)
}

// parseAddCheckpoint splits a tlog-witness add-checkpoint body.
func parseAddCheckpoint(body []byte) (old uint64, proof [][]byte, signed []byte, err error) {
	line, rest, ok := bytes.Cut(body, []byte("\n"))
	n, found := strings.CutPrefix(string(line), "old ")
	if !ok || !found {
		return 0, nil, nil, fmt.Errorf("%w: the body does not start with \"old <size>\"", ErrMalformed)
	}
	if old, err = strconv.ParseUint(n, 10, 64); err != nil {
		return 0, nil, nil, fmt.Errorf("%w: old size %q", ErrMalformed, n)
	}
	if len(rest) > 0 && rest[0] == '\n' {
		// No proof lines: the empty line follows "old N" at once.
		return old, [][]byte{}, rest[1:], nil
	}
	// The first empty line ends the proof; the note has one of its own.
	proofPart, signed, ok := bytes.Cut(rest, []byte("\n\n"))
	if !ok {
		return 0, nil, nil, fmt.Errorf("%w: no empty line before the checkpoint", ErrMalformed)
	}
	proof, err = parseProofLines(bufio.NewScanner(bytes.NewReader(append(proofPart, '\n'))), false)
	if err != nil {
		return 0, nil, nil, err
	}
	return old, proof, signed, nil
}
