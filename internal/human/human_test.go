package human

import (
	"testing"
	"time"
)

func TestDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                "0s",
		45 * time.Second:                 "45s",
		12*time.Minute + 30*time.Second:  "12m",
		4*time.Hour + 30*time.Minute:     "4h30m",
		72 * time.Hour:                   "3d",
		76*time.Hour + 59*time.Minute:    "3d4h",
		-(2*time.Hour + 5*time.Minute):   "-2h5m",
		3650 * 24 * time.Hour:            "3650d",
		24*time.Hour + 59*time.Minute:    "1d",
		time.Hour + 59*time.Second:       "1h",
		90*time.Second + time.Nanosecond: "1m",
	} {
		if got := Duration(d); got != want {
			t.Errorf("Duration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestTimeAndWhen(t *testing.T) {
	now := time.Date(2026, 12, 5, 15, 30, 59, 0, time.FixedZone("CET", 3600))
	if got := Time(now); got != "2026-12-05 14:30 UTC" {
		t.Errorf("Time = %q", got)
	}
	if got := Time(time.Time{}); got != "-" {
		t.Errorf("Time(zero) = %q", got)
	}
	if got := When(now.Add(76*time.Hour), now); got != "2026-12-08 18:30 UTC (in 3d4h)" {
		t.Errorf("When(future) = %q", got)
	}
	if got := When(now.Add(-2*time.Hour), now); got != "2026-12-05 12:30 UTC (2h ago)" {
		t.Errorf("When(past) = %q", got)
	}
}
