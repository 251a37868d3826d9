package leakcheck

import (
	"strings"
	"testing"
	"time"
)

func TestFindsLeakedGoroutine(t *testing.T) {
	stop, started := make(chan struct{}), make(chan struct{})
	go leakyWorker(started, stop)
	<-started
	found := false
	for _, g := range interestingGoroutines() {
		if strings.Contains(g, "leakcheck.leakyWorker") {
			found = true
		}
	}
	close(stop)
	if !found {
		t.Fatal("a blocked goroutine started by the test was not reported")
	}
	if leaked := wait(5 * time.Second); len(leaked) > 0 {
		t.Fatalf("goroutines left after stopping the worker:\n%s", strings.Join(leaked, "\n\n"))
	}
}

func leakyWorker(started chan<- struct{}, stop <-chan struct{}) {
	close(started)
	<-stop
}
