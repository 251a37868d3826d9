// Package leakcheck fails a test binary that ends with goroutines its tests
// started and did not stop. Call it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }
package leakcheck

import (
	"fmt"
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
	"leakcheck.interestingGoroutines",
}

// Run runs the tests, then waits up to five seconds for goroutines to end,
// and turns a passing run into a failure if any are left.
func Run(m *testing.M) int {
	code := m.Run()
	if code != 0 {
		return code
	}
	if leaked := wait(5 * time.Second); len(leaked) > 0 {
		fmt.Fprintf(os.Stderr, "leakcheck: %d goroutines leaked:\n\n%s\n", len(leaked), strings.Join(leaked, "\n\n"))
		return 1
	}
	return 0
}

func wait(limit time.Duration) []string {
	deadline := time.Now().Add(limit)
	for {
		leaked := interestingGoroutines()
		if len(leaked) == 0 || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func interestingGoroutines() []string {
	buf := make([]byte, 2<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		g = strings.TrimSpace(g)
		if g == "" || isIgnored(g) {
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
