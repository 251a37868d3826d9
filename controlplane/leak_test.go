package controlplane_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// checkGoroutines reports goroutines of trustmesh's own packages still
// running after every test has finished: a server or loop that outlived its
// Run. Library goroutines (gRPC, HTTP keep-alives, client-go) that wind down
// on their own timers are given a moment, then ignored.
func checkGoroutines() int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		leaked := ourGoroutines()
		if len(leaked) == 0 {
			return 0
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "leaked goroutines:\n%s\n", strings.Join(leaked, "\n\n"))
			return 1
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ourGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/trustmesh/trustmesh/") && !strings.Contains(g, "ourGoroutines") &&
			!strings.Contains(g, "testing.(*M)") && !strings.Contains(g, "testing.tRunner") {
			out = append(out, g)
		}
	}
	return out
}
