// Package pathnorm normalizes HTTP request paths before AuthorizationPolicy
// matching.
//
// The rules are exactly the ones the trustmesh xDS server configures in
// Envoy's HTTP connection manager (normalize_path: true, merge_slashes: true,
// path_with_escaped_slashes_action: REJECT_REQUEST), so that the path a
// policy sees is the path the upstream receives. Normalize applies them in
// Envoy's order:
//
//  1. The query string (from the first '?') and any fragment (from the first
//     '#') are removed; policies never see them.
//  2. The path must start with '/'. A path containing a NUL byte (raw or
//     "%00"), a backslash (raw or "%5C"), or an encoded slash ("%2F") is
//     rejected with ErrRejected, as is a malformed percent escape.
//  3. Percent escapes of unreserved characters (RFC 3986 section 2.3:
//     ALPHA, DIGIT, '-', '.', '_', '~') are decoded; every other escape is
//     kept, with its hex digits upper-cased ("%3a" becomes "%3A").
//  4. Dot segments are removed as in RFC 3986 section 5.2.4 ("/a/./b" is
//     "/a/b", "/a/../b" is "/b", and "/.." is "/"). Because step 3 runs
//     first, "%2e%2e" is a dot segment too.
//  5. Runs of slashes are merged into one.
//
// So a policy on /admin matches "/./admin", "//admin", "/%61dmin" and
// "/x/../admin" alike.
package pathnorm

import (
	"errors"
	"fmt"
	"strings"
)

// ErrRejected marks a path that must be denied whatever the policy says.
var ErrRejected = errors.New("pathnorm: path rejected")

// Split returns the path without its query string and fragment, and the raw
// query string (without '?').
func Split(raw string) (path, query string) {
	if i := strings.IndexByte(raw, '#'); i >= 0 {
		raw = raw[:i]
	}
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		return raw[:i], raw[i+1:]
	}
	return raw, ""
}

// Normalize returns the normalized form of the request path raw (which may
// carry a query string). An error wraps ErrRejected.
func Normalize(raw string) (string, error) {
	p, _ := Split(raw)
	if p == "" || p[0] != '/' {
		return "", fmt.Errorf("%w: %q does not start with '/'", ErrRejected, p)
	}
	decoded, err := decodeUnreserved(p)
	if err != nil {
		return "", err
	}
	return mergeSlashes(removeDotSegments(decoded)), nil
}

func decodeUnreserved(p string) (string, error) {
	if strings.IndexByte(p, '%') < 0 && strings.IndexByte(p, 0) < 0 && strings.IndexByte(p, '\\') < 0 {
		return p, nil
	}
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch c {
		case 0:
			return "", fmt.Errorf("%w: NUL byte", ErrRejected)
		case '\\':
			return "", fmt.Errorf("%w: backslash", ErrRejected)
		case '%':
			if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
				return "", fmt.Errorf("%w: malformed percent escape at offset %d", ErrRejected, i)
			}
			v := unhex(p[i+1])<<4 | unhex(p[i+2])
			switch {
			case v == 0:
				return "", fmt.Errorf("%w: encoded NUL", ErrRejected)
			case v == '/' || v == '\\':
				return "", fmt.Errorf("%w: encoded slash or backslash", ErrRejected)
			case isUnreserved(v):
				b.WriteByte(v)
			default:
				b.WriteByte('%')
				b.WriteByte(upper(p[i+1]))
				b.WriteByte(upper(p[i+2]))
			}
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), nil
}

// removeDotSegments implements RFC 3986 section 5.2.4 for an absolute path.
func removeDotSegments(p string) string {
	if !strings.Contains(p, ".") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	return "/" + strings.Join(out, "/")
}

func mergeSlashes(p string) string {
	if !strings.Contains(p, "//") {
		return p
	}
	var b strings.Builder
	b.Grow(len(p))
	for i := 0; i < len(p); i++ {
		if p[i] == '/' && i > 0 && p[i-1] == '/' {
			continue
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

func upper(c byte) byte {
	if 'a' <= c && c <= 'f' {
		return c - 'a' + 'A'
	}
	return c
}
