// Package leakcheck finds goroutines of trustmesh's own packages still
// running after a package's tests: a server or loop that outlived its Run.
package leakcheck

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"
)

// Check waits up to five seconds for trustmesh goroutines to end (library
// goroutines wind down on their own timers), then reports the survivors to
// w and returns 1, or returns 0. Call it from TestMain after m.Run.
func Check(w io.Writer) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		leaked := ours()
		if len(leaked) == 0 {
			return 0
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(w, "leaked goroutines:\n%s\n", strings.Join(leaked, "\n\n"))
			return 1
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ours() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/trustmesh/trustmesh/") && !strings.Contains(g, "leakcheck.ours") &&
			!strings.Contains(g, "testing.(*M)") && !strings.Contains(g, "testing.tRunner") {
			out = append(out, g)
		}
	}
	return out
}
