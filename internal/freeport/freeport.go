// Package freeport gives tests loopback addresses for servers that bind
// them later, such as a process the test starts.
//
// A port the kernel chose for a listener on port 0 and that was then
// closed is in the kernel's ephemeral range, from which it also chooses
// the source port of every outgoing connection and the port of every
// other listener on port 0. Under a parallel test run another socket can
// take such a port before the server binds it, and the server fails with
// "bind: address already in use". The ports here come from below the
// ephemeral range, which the kernel never hands out by itself, and are
// checked free when chosen; a process never gets the same one twice. A
// test that can serve on port 0 and read the bound address back should do
// that instead.
package freeport

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// lowest is the lowest port chosen: above the ports services listen on
// by convention.
const lowest = 10000

var (
	mu     sync.Mutex
	handed = map[int]bool{}
)

// Addr returns 127.0.0.1:port, a port free when it returns that the kernel
// does not hand out by itself.
func Addr(t testing.TB) string {
	t.Helper()
	a, err := Get()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Port is Addr's port alone.
func Port(t testing.TB) string {
	t.Helper()
	_, port, err := net.SplitHostPort(Addr(t))
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// Get is Addr for callers without a testing.TB.
func Get() (string, error) {
	first, err := ephemeralStart()
	if err != nil {
		return "", err
	}
	if first <= lowest+1024 {
		return "", fmt.Errorf("freeport: the ephemeral range starts at %d, leaving no ports below it", first)
	}
	mu.Lock()
	defer mu.Unlock()
	for range 1000 {
		port := lowest + rand.IntN(first-lowest)
		if handed[port] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		addr := l.Addr().String()
		if err := l.Close(); err != nil {
			return "", fmt.Errorf("freeport: %w", err)
		}
		handed[port] = true
		return addr, nil
	}
	return "", fmt.Errorf("freeport: no free port found in %d-%d", lowest, first-1)
}

// ephemeralStart is the first port of the kernel's ephemeral range:
// Linux's setting, or its default where the setting cannot be read.
func ephemeralStart() (int, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if errors.Is(err, os.ErrNotExist) {
		return 32768, nil
	}
	if err != nil {
		return 0, fmt.Errorf("freeport: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, fmt.Errorf("freeport: ip_local_port_range %q", b)
	}
	return strconv.Atoi(f[0])
}
