package pathnorm

import (
	"errors"
	"strings"
	"testing"
)

func TestNormalize(t *testing.T) {
	tests := []struct {
		in, want string
		rejected bool
	}{
		{in: "/admin", want: "/admin"},
		{in: "/./admin", want: "/admin"},
		{in: "//admin", want: "/admin"},
		{in: "/%61dmin", want: "/admin"},
		{in: "/%2e%2e/admin", want: "/admin"},
		{in: "/x/../admin", want: "/admin"},
		{in: "/x//../admin", want: "/x/admin"},
		{in: "/admin?x=1#frag", want: "/admin"},
		{in: "/a/b/.", want: "/a/b/"},
		{in: "/a/..", want: "/"},
		{in: "/..", want: "/"},
		{in: "/a%3ab", want: "/a%3Ab"},
		{in: "/a%20b", want: "/a%20b"},
		{in: "/a///b//", want: "/a/b/"},
		{in: "/", want: "/"},
		{in: "/a%2Fb", rejected: true},
		{in: "/a%2fb", rejected: true},
		{in: "/a%5Cb", rejected: true},
		{in: "/a%5cb", rejected: true},
		{in: "/a\\b", rejected: true},
		{in: "/a%00", rejected: true},
		{in: "/a\x00", rejected: true},
		{in: "/a%zz", rejected: true},
		{in: "/a%4", rejected: true},
		{in: "admin", rejected: true},
		{in: "", rejected: true},
		{in: "?x=/admin", rejected: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Normalize(tt.in)
			if tt.rejected {
				if !errors.Is(err, ErrRejected) {
					t.Fatalf("Normalize(%q) = %q, %v; want ErrRejected", tt.in, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Normalize(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

// FuzzNormalize checks that normalization is idempotent and that its output
// has no dot segments, repeated slashes or encoded unreserved characters.
func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"/a/./b", "//a", "/%61", "/a/../../b", "/%2e%2E/x", "/a?b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := Normalize(in)
		if err != nil {
			if !errors.Is(err, ErrRejected) {
				t.Fatalf("error %v does not wrap ErrRejected", err)
			}
			return
		}
		again, err := Normalize(out)
		if err != nil || again != out {
			t.Fatalf("Normalize not idempotent: %q -> %q -> %q, %v", in, out, again, err)
		}
		if strings.Contains(out, "//") || strings.Contains(out, "/./") || strings.Contains(out, "/../") ||
			strings.HasSuffix(out, "/.") || strings.HasSuffix(out, "/..") || strings.ContainsAny(out, "?#") {
			t.Fatalf("Normalize(%q) = %q is not normal", in, out)
		}
	})
}
