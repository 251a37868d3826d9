// Package human spells times and durations for people: tables and prose
// say "2026-12-05 15:30 UTC" and "3d4h", where JSON says RFC 3339 and Go
// duration strings ("72h0m0s").
package human

import (
	"fmt"
	"strings"
	"time"
)

// Time spells t as "2026-12-05 15:30 UTC", or "-" when zero.
func Time(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04 MST")
}

// Duration spells d with its two largest units: "3d4h", "4h30m", "12m",
// "45s".
func Duration(d time.Duration) string {
	var b strings.Builder
	if d < 0 {
		b.WriteByte('-')
		d = -d
	}
	days := d / (24 * time.Hour)
	hours := d % (24 * time.Hour) / time.Hour
	mins := d % time.Hour / time.Minute
	secs := d % time.Minute / time.Second
	switch {
	case days > 0:
		fmt.Fprintf(&b, "%dd", days)
		if hours > 0 {
			fmt.Fprintf(&b, "%dh", hours)
		}
	case hours > 0:
		fmt.Fprintf(&b, "%dh", hours)
		if mins > 0 {
			fmt.Fprintf(&b, "%dm", mins)
		}
	case mins > 0:
		fmt.Fprintf(&b, "%dm", mins)
	default:
		fmt.Fprintf(&b, "%ds", secs)
	}
	return b.String()
}

// When spells t relative to now: "2026-12-05 15:30 UTC (in 3d4h)" or
// "2026-12-05 15:30 UTC (2h ago)"; "-" when zero.
func When(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	if d := t.Sub(now); d >= 0 {
		return fmt.Sprintf("%s (in %s)", Time(t), Duration(d))
	}
	return fmt.Sprintf("%s (%s ago)", Time(t), Duration(now.Sub(t)))
}
