package decisionlog

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// encoder writes log lines. It is owned by Run's goroutine: its scratch
// space is reused from line to line, so that a line costs no allocation
// on the common path (no query string to redact, no path pattern).
type encoder struct {
	l    *Logger
	keys []string // the request's header names, sorted
	ids  idSource
}

// appendLine appends the JSON line of a decision, without its newline. It
// is byte for byte what encoding/json makes of the Entry that Logger.Entry
// builds (TestEncoderMatchesEncodingJSON): the format is the same as
// before it was hand-written, only cheaper.
func (enc *encoder) appendLine(b []byte, at time.Time, req *authv3.CheckRequest, d *engine.Decision) ([]byte, error) {
	l := enc.l
	a := req.GetAttributes()
	b = append(b, `{"decision_id":"`...)
	if l.newID != nil {
		b = appendStringBody(b, l.newID())
	} else {
		b = enc.ids.appendUUID(b)
	}
	b = append(b, `","time":`...)
	at = at.UTC()
	if y := at.Year(); y < 0 || y > 9999 {
		// encoding/json refuses these too (time.Time.MarshalJSON).
		return b, fmt.Errorf("decisionlog: time %v has a year outside [0,9999]", at)
	}
	b = append(b, '"')
	b = at.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","source":`...)
	b = appendPeer(b, a.GetSource().GetPrincipal(), a.GetSource().GetAddress().GetSocketAddress().GetAddress())
	b = append(b, `,"destination":`...)
	b = appendPeer(b, a.GetDestination().GetPrincipal(), a.GetDestination().GetAddress().GetSocketAddress().GetAddress())
	h := a.GetRequest().GetHttp()
	if h == nil {
		b = append(b, `,"protocol":"tcp"`...)
	} else {
		b = append(b, `,"protocol":"http"`...)
		b = appendField(b, "method", h.GetMethod())
		b = appendField(b, "host", h.GetHost())
		b = appendField(b, "path", l.red.Path(h.GetPath()))
		if hs := h.GetHeaders(); len(hs) > 0 {
			enc.keys = enc.keys[:0]
			for k := range hs {
				enc.keys = append(enc.keys, k)
			}
			slices.Sort(enc.keys)
			b = append(b, `,"headers":{`...)
			for i, k := range enc.keys {
				if i > 0 {
					b = append(b, ',')
				}
				b = appendString(b, k)
				b = append(b, ':')
				b = appendString(b, l.red.Header(k, hs[k]))
			}
			b = append(b, '}')
			clear(enc.keys) // keep no request's strings alive
		}
	}
	b = append(b, `,"allowed":`...)
	b = strconv.AppendBool(b, d.Allowed)
	if !d.Allowed && d.HTTPStatus != 0 {
		b = append(b, `,"http_status":`...)
		b = strconv.AppendInt(b, int64(d.HTTPStatus), 10)
	}
	b = append(b, `,"reason":`...)
	b = appendString(b, d.Reason)
	b = appendField(b, "policy", d.Policy)
	if d.Rule != nil {
		b = append(b, `,"rule":`...)
		b = strconv.AppendInt(b, int64(*d.Rule), 10)
	}
	b = appendField(b, "action", d.Action)
	if len(d.Audit) > 0 {
		b = append(b, `,"audit":[`...)
		for i, m := range d.Audit {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"policy":`...)
			b = appendString(b, m.Policy)
			b = append(b, `,"rule":`...)
			b = strconv.AppendInt(b, int64(m.Rule), 10)
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	if s := d.DryRun; s != nil {
		b = append(b, `,"dry_run":{"allowed":`...)
		b = strconv.AppendBool(b, s.Allowed)
		b = append(b, `,"reason":`...)
		b = appendString(b, s.Reason)
		b = appendField(b, "policy", s.Policy)
		if s.Rule != nil {
			b = append(b, `,"rule":`...)
			b = strconv.AppendInt(b, int64(*s.Rule), 10)
		}
		b = append(b, '}')
	}
	b = appendField(b, "error", l.red.Text(d.Error))
	if d.PolicyVersion != 0 {
		b = append(b, `,"policy_version":`...)
		b = strconv.AppendUint(b, d.PolicyVersion, 10)
	}
	b = appendField(b, "policy_digest", d.PolicyDigest)
	return append(b, '}'), nil
}

// appendPeer appends a Peer object.
func appendPeer(b []byte, principal, address string) []byte {
	b = append(b, '{')
	n := len(b)
	if principal != "" {
		b = append(b, `"principal":`...)
		b = appendString(b, principal)
	}
	if address != "" {
		if len(b) > n {
			b = append(b, ',')
		}
		b = append(b, `"address":`...)
		b = appendString(b, address)
	}
	return append(b, '}')
}

// appendField appends `,"name":"value"`, or nothing when value is empty
// (omitempty). name must need no escaping.
func appendField(b []byte, name, value string) []byte {
	if value == "" {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendString(b, value)
}

// appendString appends s as a JSON string, quoted.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	b = appendStringBody(b, s)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// appendStringBody appends s escaped as encoding/json escapes it by
// default: the two-character escapes for quote, backslash, \b, \f, \n, \r
// and \t; \u00XX for other control characters and for <, > and & (HTML
// safety); \ufffd for each byte of invalid UTF-8; \u2028 and \u2029.
func appendStringBody(b []byte, s string) []byte {
	start := 0 // s[start:i] is still to be copied as is
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	return append(b, s[start:]...)
}

// idSource makes random (version 4) UUIDs, as uuid.NewString does, from
// random bytes read a block at a time.
type idSource struct {
	buf  [16 * 256]byte
	next int // buf[next:] is unused
}

func (s *idSource) appendUUID(b []byte) []byte {
	if s.next == 0 || s.next == len(s.buf) {
		// crypto/rand.Read never fails (it panics if the kernel cannot
		// give randomness).
		_, _ = rand.Read(s.buf[:])
		s.next = 0
	}
	u := s.buf[s.next : s.next+16]
	s.next += 16
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	b = hex.AppendEncode(b, u[0:4])
	b = append(b, '-')
	b = hex.AppendEncode(b, u[4:6])
	b = append(b, '-')
	b = hex.AppendEncode(b, u[6:8])
	b = append(b, '-')
	b = hex.AppendEncode(b, u[8:10])
	b = append(b, '-')
	return hex.AppendEncode(b, u[10:16])
}
