package rotation

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// cutOff runs h with the CA unreachable from start until the agent's
// first certificate has expired, checking on the way that the certificate
// is served, and Health is nil, up to its expiry. It returns the expiry.
func cutOff(t *testing.T, h *harness) time.Time {
	t.Helper()
	h.settle()
	first := h.svid()
	if first == nil {
		t.Fatal("no certificate at start")
	}
	expiry := svid.Expiry(first)
	h.ca.set(func(f *fakeCA) { f.down = true })
	h.step(30 * time.Minute) // the renewal fails: the CA is cut off from here on
	for h.clock.Now().Add(time.Minute).Before(expiry) {
		h.step(time.Minute)
		if h.svid() != first {
			t.Fatalf("at %s, before expiry at %s, the certificate is not served", h.clock.Now(), expiry)
		}
		if err := h.mgr.Health(); err != nil {
			t.Fatalf("at %s, with a valid certificate, Health = %v", h.clock.Now(), err)
		}
	}
	for !h.clock.Now().After(expiry) {
		h.step(time.Minute)
	}
	if s := h.svid(); s != nil {
		t.Fatalf("the certificate is still served at %s, after its expiry at %s", h.clock.Now(), expiry)
	}
	return expiry
}

// TestCutOffAgentSaysWhyAndReenrolsWithItsToken: an agent cut off from the
// CA for longer than its certificate's life serves the certificate until
// it expires, then says why it has none: when it expired, since when the
// CA, named, has been unreachable, and the CA's error; in Health (its
// /healthz) and in its log. When the CA returns, the agent's token (a
// projected service-account token, read at every use) enrols it again.
func TestCutOffAgentSaysWhyAndReenrolsWithItsToken(t *testing.T) {
	var logs syncBuffer
	h := newHarness(t, func(c *Config) {
		c.CA = "ca.test:8443"
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	expiry := cutOff(t, h)
	err := h.mgr.Health()
	want := "certificate expired at " + expiry.UTC().Format(time.RFC3339) +
		"; the CA at ca.test:8443 unreachable since " + start.Add(30*time.Minute).Format(time.RFC3339) +
		": rotation: issue with token: rpc error: code = Unavailable desc = connection refused"
	if err == nil || err.Error() != want {
		t.Fatalf("Health after expiry = %v\nwant %s", err, want)
	}
	if strings.Contains(err.Error(), NeedsJoinToken) {
		t.Errorf("an agent with a service-account token says %q", NeedsJoinToken)
	}
	if !strings.Contains(logs.String(), "unreachable since "+start.Add(30*time.Minute).Format(time.RFC3339)) {
		t.Errorf("the log does not say since when the CA is unreachable:\n%s", logs.String())
	}
	h.ca.set(func(f *fakeCA) { f.down = false })
	h.step(time.Minute)
	if s := h.svid(); s == nil || s.ID != ownID {
		t.Fatal("no certificate after the CA came back")
	}
	if calls := h.ca.callLog(); calls[len(calls)-1] != "token" {
		t.Fatalf("the agent came back by %q, want its token", calls[len(calls)-1])
	}
	if err := h.mgr.Health(); err != nil {
		t.Fatalf("Health after re-enrolment = %v", err)
	}
}

// TestCutOffJoinTokenAgentNeedsANewJoinToken: an agent enrolled by a join
// token, cut off past its certificate's expiry, says it needs a new join
// token (its own was spent on its first certificate), in Health while the
// CA is away and in the error and log it stops with when the CA, back,
// refuses the spent token.
func TestCutOffJoinTokenAgentNeedsANewJoinToken(t *testing.T) {
	var logs syncBuffer
	h := newHarness(t, func(c *Config) {
		c.JoinToken = true
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	cutOff(t, h)
	if err := h.mgr.Health(); err == nil || !strings.Contains(err.Error(), "; "+NeedsJoinToken+": ") {
		t.Fatalf("Health of a join-token agent after expiry = %v; want it to say %q", err, NeedsJoinToken)
	}
	h.ca.set(func(f *fakeCA) { f.down, f.tokenRefusal = false, cav1.JoinTokenUsed })
	h.clock.Step(time.Minute)
	err := h.stopped()
	var refused *JoinTokenRefusedError
	if !errors.As(err, &refused) || !strings.Contains(err.Error(), NeedsJoinToken) {
		t.Fatalf("Run = %v; want the spent token's refusal saying %q", err, NeedsJoinToken)
	}
	if !strings.Contains(logs.String(), NeedsJoinToken) {
		t.Errorf("the log does not say %q:\n%s", NeedsJoinToken, logs.String())
	}
}
