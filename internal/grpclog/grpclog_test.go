package grpclog_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	grpcgrpclog "google.golang.org/grpc/grpclog"

	"github.com/trustmesh/trustmesh/internal/grpclog"
)

// recorder keeps the records a handler at level receives.
type recorder struct {
	level   slog.Level
	mu      sync.Mutex
	records []slog.Record
}

func (r *recorder) Enabled(_ context.Context, l slog.Level) bool { return l >= r.level }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, rec)
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

func (r *recorder) take() []slog.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.records
	r.records = nil
	return out
}

// TestLevels logs through grpc-go's own entry points (the global functions
// and a component logger, which use the Depth methods) and checks the level,
// the message and the caller of every record.
func TestLevels(t *testing.T) {
	rec := &recorder{level: slog.LevelDebug}
	grpcgrpclog.SetLoggerV2(grpclog.New(slog.New(rec), 0))
	core := grpcgrpclog.Component("core")
	for name, tc := range map[string]struct {
		log   func()
		level slog.Level
		msg   string
	}{
		"Info":               {func() { grpcgrpclog.Info("a", 1) }, slog.LevelDebug, "a1"},
		"Infof":              {func() { grpcgrpclog.Infof("a %d", 1) }, slog.LevelDebug, "a 1"},
		"Infoln":             {func() { grpcgrpclog.Infoln("a", 1) }, slog.LevelDebug, "a 1"},
		"Warning":            {func() { grpcgrpclog.Warning("w") }, slog.LevelWarn, "w"},
		"Warningf":           {func() { grpcgrpclog.Warningf("w %s", "x") }, slog.LevelWarn, "w x"},
		"Error":              {func() { grpcgrpclog.Error("e") }, slog.LevelError, "e"},
		"Errorf":             {func() { grpcgrpclog.Errorf("e %s", "x") }, slog.LevelError, "e x"},
		"component Infof":    {func() { core.Infof("state %s", "READY") }, slog.LevelDebug, "[core] state READY"},
		"component Warningf": {func() { core.Warningf("retry %d", 2) }, slog.LevelWarn, "[core] retry 2"},
		"component Errorf":   {func() { core.Errorf("failed: %v", "x") }, slog.LevelError, "[core] failed: x"},
	} {
		t.Run(name, func(t *testing.T) {
			tc.log()
			got := rec.take()
			if len(got) != 1 {
				t.Fatalf("%d records, want 1", len(got))
			}
			r := got[0]
			if r.Level != tc.level || r.Message != tc.msg {
				t.Errorf("record %v %q, want %v %q", r.Level, r.Message, tc.level, tc.msg)
			}
			f, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
			if filepath.Base(f.File) != "grpclog_test.go" {
				t.Errorf("record's caller is %s:%d (%s), want this test", f.File, f.Line, f.Function)
			}
		})
	}
}

// TestLevelFilter checks that the slog logger's level decides: grpc-go's
// INFO is hidden at Info, its warnings and errors are not.
func TestLevelFilter(t *testing.T) {
	rec := &recorder{level: slog.LevelInfo}
	grpcgrpclog.SetLoggerV2(grpclog.New(slog.New(rec), 0))
	grpcgrpclog.Component("core").Infof("Channel Connectivity change to READY")
	grpcgrpclog.Warning("w")
	grpcgrpclog.Error("e")
	var levels []slog.Level
	for _, r := range rec.take() {
		levels = append(levels, r.Level)
	}
	if len(levels) != 2 || levels[0] != slog.LevelWarn || levels[1] != slog.LevelError {
		t.Errorf("levels %v, want [WARN ERROR]", levels)
	}
}

func TestVerbosity(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{{"", 0}, {"2", 2}, {" 99 ", 99}, {"x", 0}} {
		if got := grpclog.Verbosity(tc.env); got != tc.want {
			t.Errorf("Verbosity(%q) = %d, want %d", tc.env, got, tc.want)
		}
	}
	l := grpclog.New(slog.New(slog.DiscardHandler), 2)
	for v, want := range map[int]bool{0: true, 2: true, 3: false} {
		if got := l.V(v); got != want {
			t.Errorf("V(%d) = %v at verbosity 2", v, got)
		}
	}
}

// TestInstall checks that Install reads grpc-go's verbosity variable.
func TestInstall(t *testing.T) {
	t.Setenv(grpclog.VerbosityEnv, "2")
	grpclog.Install(slog.New(slog.DiscardHandler))
	if !grpcgrpclog.V(2) || grpcgrpclog.V(3) {
		t.Errorf("V(2), V(3) = %v, %v with %s=2, want true, false", grpcgrpclog.V(2), grpcgrpclog.V(3), grpclog.VerbosityEnv)
	}
}
