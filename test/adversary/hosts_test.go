package adversary

import "testing"

// TestHostForms (class 6): a DENY on a host is not bypassed by a port, a
// trailing dot or case.
func TestHostForms(t *testing.T) {
	s := shared(t)
	host := func(h string) check { return check{dst: "hosts", src: webID, host: h} }
	runDecisions(t, s, []decisionCase{
		{"control: another host", host("www.example.com"), allow},
		{"exact", host("admin.example.com"), deny},
		{"upper case", host("ADMIN.Example.COM"), deny},
		{"port 443", host("admin.example.com:443"), deny},
		{"port 9080", host("admin.example.com:9080"), deny},
		{"trailing dot", host("admin.example.com."), deny},
		{"trailing dot and port", host("admin.example.com.:443"), deny},
		{"IPv6 literal with a port", check{dst: "v6-host", src: webID, host: "[::1]:8080"}, deny},
	})
}
