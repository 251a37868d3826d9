// Package leakcheck fails a test binary whose tests leave goroutines
// running: a server or loop that outlived its Run, a connection never
// closed. Call it from TestMain.
package leakcheck

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// ignored are goroutines owned by the runtime and the test framework.
var ignored = []string{
	"testing.Main(",
	"testing.(*M).",
	"testing.tRunner(",
	"created by runtime.gc",
	"runtime.MHeap_Scavenger",
	"signal.signal_recv",
	"leakcheck.goroutines",
}

// Run runs the tests, then waits up to five seconds for every goroutine
// they started to end, and turns a passing run into a failure if any is
// left:
//
//	func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }
func Run(m *testing.M) int {
	code := m.Run()
	if code != 0 {
		return code
	}
	return report(os.Stderr, func(string) bool { return true })
}

// CheckOurs is for packages whose libraries keep goroutines of their own for
// the life of the process (client-go, envtest): after m.Run, it fails only
// on goroutines running trustmesh code. It returns the exit code.
func CheckOurs(w io.Writer) int {
	return report(w, func(g string) bool { return strings.Contains(g, "github.com/trustmesh/trustmesh/") })
}

func report(w io.Writer, keep func(string) bool) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		leaked := goroutines(keep)
		if len(leaked) == 0 {
			return 0
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(w, "leakcheck: %d goroutine(s) leaked:\n\n%s\n", len(leaked), strings.Join(leaked, "\n\n"))
			return 1
		}
		time.Sleep(50 * time.Millisecond) // goroutines wind down on their own timers
	}
}

func goroutines(keep func(string) bool) []string {
	buf := make([]byte, 2<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		g = strings.TrimSpace(g)
		if g == "" || isIgnored(g) || !keep(g) {
			continue
		}
		out = append(out, g)
	}
	return out
}

func isIgnored(g string) bool {
	for _, s := range ignored {
		if strings.Contains(g, s) {
			return true
		}
	}
	return false
}
