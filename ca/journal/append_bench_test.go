package journal_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// BenchmarkAppend measures the journal alone: durable issuance records per
// second at 1, 16 and 256 concurrent callers, on SQLite and (when the test
// script provides a server) PostgreSQL, each record committed (fsync and
// signed checkpoint included) before its call returns. The CA's issuance
// rate with the journal on can never exceed it.
//
// Beside the rate it reports appends per commit (each commit is one durable
// sync of the database's log and one signed checkpoint) and the disk's own
// synced-write rate, measured in the same run in the same directory: a
// lone caller waits for its own sync, so at c=1 the rate cannot exceed the
// disk's without giving up durability.
//
// cpu-us/append is this process's CPU (user and system, all threads: the
// callers, the committer and the database driver, and for SQLite the
// database itself) over the timed window, per append.
func BenchmarkAppend(b *testing.B) {
	for _, be := range backends(b) {
		for _, c := range []int{1, 16, 256} {
			b.Run(fmt.Sprintf("%s/c=%d", be.name, c), func(b *testing.B) {
				benchmarkAppend(b, be, c)
			})
		}
	}
}

func benchmarkAppend(b *testing.B, be backend, c int) {
	ctx := context.Background()
	if be.name == "sqlite" {
		// Each run gets a fresh file; PostgreSQL's database is fresh per
		// backends call, and its log only grows.
		be.dsn = filepath.Join(b.TempDir(), "journal.db")
	}
	// The testing package discards the metrics of its one-op probe run:
	// spare it the 200 synced writes.
	syncs := math.NaN()
	if b.N > 1 {
		syncs = syncRate(b, b.TempDir())
	}
	s := be.open(b)
	before, err := s.Checkpoints(ctx)
	if err != nil {
		b.Fatal(err)
	}
	const id = "spiffe://cluster.local/ns/bench/sa/append"
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	cpuBefore := processCPU(b)
	start := time.Now()
	for range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
				if _, err := s.RecordIssuance(ctx, renewal(fmt.Sprintf("%x-%x", start.UnixNano(), 0x10000+i), id), nil); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := processCPU(b) - cpuBefore
	b.StopTimer()
	after, err := s.Checkpoints(ctx)
	if err != nil {
		b.Fatal(err)
	}
	rate := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "appends/s")
	b.ReportMetric(float64(b.N)/float64(len(after)-len(before)), "appends/commit")
	b.ReportMetric(syncs, "disk-syncs/s")
	b.ReportMetric(rate/syncs, "appends/disk-sync")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/append")
}

// processCPU is the user and system CPU this process has used so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// renewal is the CA's most common issuance: a certificate renewed with the
// one it replaces.
func renewal(serial, id string) journal.Issuance {
	return journal.Issuance{Time: t0, Serial: serial, SPIFFEID: id, Method: "x509-renewal", Caller: "7f0c1d2e3a4b5c6d",
		Origin: journal.OriginJoinToken, NotBefore: t0, NotAfter: t0.Add(time.Hour), Issuer: "01",
		PublicKeySHA256: "4c5fd5a1b7a4c0e3b1a9e0f6c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e",
		CertSHA256:      "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"}
}

// syncRate is how many 4 KiB writes per second, each followed by fsync, the
// disk under dir takes (what dd oflag=dsync measures), over 200 writes.
func syncRate(b *testing.B, dir string) float64 {
	f, err := os.Create(filepath.Join(dir, "sync-floor"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	const n = 200
	start := time.Now()
	for i := range n {
		if _, err := f.WriteAt(buf, int64(i)*4096); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	return n / time.Since(start).Seconds()
}
