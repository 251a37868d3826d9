// Package serial is trustmesh's one spelling of certificate serial numbers:
// lowercase hexadecimal without leading zeros or separators, as the journal
// records them ("5f1c0a…"). Parse reads that and the forms people paste:
// `openssl x509 -serial` ("serial=0A1B…"), colon-separated bytes
// ("0a:1b:…"), a "0x" prefix, either case, with or without leading zeros.
package serial

import (
	"errors"
	"fmt"
	"math/big"
	"strings"
)

// Format spells n the way the journal, the logs and the CLI do.
func Format(n *big.Int) string { return n.Text(16) }

// Parse reads a serial number in any accepted form and returns it in
// Format's spelling.
func Parse(s string) (*big.Int, error) {
	in := s
	s = strings.TrimSpace(s)
	if k, v, ok := strings.Cut(s, "="); ok && strings.EqualFold(strings.TrimSpace(k), "serial") {
		s = strings.TrimSpace(v)
	}
	if len(s) > 1 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		s = s[2:]
	}
	if strings.Contains(s, ":") {
		parts := strings.Split(s, ":")
		for i, p := range parts {
			if len(p) == 0 || len(p) > 2 {
				return nil, fmt.Errorf("serial: %q: colons must separate bytes of one or two hex digits", in)
			}
			// Each group is one byte: "d" is 0d, not a lone digit
			// that would shift every byte after it.
			if len(p) == 1 {
				parts[i] = "0" + p
			}
		}
		s = strings.Join(parts, "")
	}
	if s == "" {
		return nil, errors.New("serial: empty serial number")
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return nil, fmt.Errorf("serial: %q is not a hexadecimal serial number (like 5f1c0a or the output of openssl x509 -serial)", in)
		}
	}
	n, ok := new(big.Int).SetString(s, 16)
	if !ok {
		return nil, fmt.Errorf("serial: %q is not a hexadecimal serial number", in)
	}
	return n, nil
}

// Normalize is Format(Parse(s)).
func Normalize(s string) (string, error) {
	n, err := Parse(s)
	if err != nil {
		return "", err
	}
	return Format(n), nil
}
