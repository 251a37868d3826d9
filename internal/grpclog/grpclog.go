// Package grpclog writes grpc-go's logs to a *slog.Logger, so that they
// share the process's format, level and destination instead of grpc-go's
// own "ERROR: 2026/…" lines on stderr.
//
// Levels map as grpc-go means them: its WARNING and ERROR are slog's Warn
// and Error, and its FATAL is Error (grpc-go exits after it). Its INFO is
// slog's Debug: grpc-go logs at INFO every channel, subchannel and
// transport state change, detail that its own default logger hides and
// that an operator turns on to debug gRPC, not to watch a healthy process.
// Verbose logs (V(l)) are on up to GRPC_GO_LOG_VERBOSITY_LEVEL, as with
// grpc-go's own logger.
package grpclog

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/grpclog"
)

// VerbosityEnv is grpc-go's variable for the verbosity of its logs.
const VerbosityEnv = "GRPC_GO_LOG_VERBOSITY_LEVEL"

// Logger is a grpclog.LoggerV2 and DepthLoggerV2 over a *slog.Logger.
type Logger struct {
	log       *slog.Logger
	verbosity int
}

var _ grpclog.DepthLoggerV2 = (*Logger)(nil)

// New returns a Logger that writes to log, with verbose logs on up to
// verbosity. Every record carries system=grpc.
func New(log *slog.Logger, verbosity int) *Logger {
	return &Logger{log: log.With("system", "grpc"), verbosity: verbosity}
}

// Verbosity parses a value of GRPC_GO_LOG_VERBOSITY_LEVEL as grpc-go does:
// an integer, and 0 when unset or not an integer.
func Verbosity(v string) int {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		return 0
	}
	return n
}

// Install makes log grpc-go's logger, with the verbosity the environment
// sets. grpc-go holds one logger per process, unguarded: call Install once,
// before any gRPC call, as a main function does.
func Install(log *slog.Logger) {
	grpclog.SetLoggerV2(New(log, Verbosity(os.Getenv(VerbosityEnv))))
}

// The frames between a grpc-go log call and runtime.Callers: Callers, emit,
// the Logger method, and grpclog's function (grpclog.Info, InfoDepth...).
const skip = 4

func (l *Logger) emit(level slog.Level, depth int, msg string) {
	ctx := context.Background()
	if !l.log.Enabled(ctx, level) {
		return
	}
	var pcs [1]uintptr
	runtime.Callers(skip+depth, pcs[:])
	_ = l.log.Handler().Handle(ctx, slog.NewRecord(time.Now(), level, msg, pcs[0]))
}

// sprintln formats args as fmt.Println does, without the newline.
func sprintln(args []any) string { return strings.TrimSuffix(fmt.Sprintln(args...), "\n") }

// Info logs at Debug; see the package comment.
func (l *Logger) Info(args ...any)   { l.emit(slog.LevelDebug, 0, fmt.Sprint(args...)) }
func (l *Logger) Infoln(args ...any) { l.emit(slog.LevelDebug, 0, sprintln(args)) }
func (l *Logger) Infof(format string, args ...any) {
	l.emit(slog.LevelDebug, 0, fmt.Sprintf(format, args...))
}
func (l *Logger) InfoDepth(depth int, args ...any) { l.emit(slog.LevelDebug, depth, sprintln(args)) }

func (l *Logger) Warning(args ...any)   { l.emit(slog.LevelWarn, 0, fmt.Sprint(args...)) }
func (l *Logger) Warningln(args ...any) { l.emit(slog.LevelWarn, 0, sprintln(args)) }
func (l *Logger) Warningf(format string, args ...any) {
	l.emit(slog.LevelWarn, 0, fmt.Sprintf(format, args...))
}
func (l *Logger) WarningDepth(depth int, args ...any) { l.emit(slog.LevelWarn, depth, sprintln(args)) }

func (l *Logger) Error(args ...any)   { l.emit(slog.LevelError, 0, fmt.Sprint(args...)) }
func (l *Logger) Errorln(args ...any) { l.emit(slog.LevelError, 0, sprintln(args)) }
func (l *Logger) Errorf(format string, args ...any) {
	l.emit(slog.LevelError, 0, fmt.Sprintf(format, args...))
}
func (l *Logger) ErrorDepth(depth int, args ...any) { l.emit(slog.LevelError, depth, sprintln(args)) }

// Fatal logs at Error; grpc-go exits after it.
func (l *Logger) Fatal(args ...any)   { l.emit(slog.LevelError, 0, fmt.Sprint(args...)) }
func (l *Logger) Fatalln(args ...any) { l.emit(slog.LevelError, 0, sprintln(args)) }
func (l *Logger) Fatalf(format string, args ...any) {
	l.emit(slog.LevelError, 0, fmt.Sprintf(format, args...))
}
func (l *Logger) FatalDepth(depth int, args ...any) { l.emit(slog.LevelError, depth, sprintln(args)) }

// V reports whether verbose logs of level v are on.
func (l *Logger) V(v int) bool { return v <= l.verbosity }
