// Command authz-load drives an Envoy ext_authz v3 gRPC server the way
// shared/bench's extauthz-load does (closed loop: -c workers over one
// connection, each sending its next Check when the previous one returns,
// the same protojson request file cycled, a warm-up discarded), and prints
// one JSON line that adds the p99.9 extauthz-load does not print. bench/
// authz.sh calibrates it against extauthz-load on the same no-op floor in
// the same run.
//
// Latencies go into a log-linear histogram per worker (128 sub-buckets per
// power of two of nanoseconds: under 0.8 % relative error), merged at the
// end; min, max and mean are exact.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/bits"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "authz-load: %v\n", err)
		os.Exit(1)
	}
}

type options struct {
	addr, requests, cert, key, ca, serverName string
	conc                                      int
	dur, warmup, timeout                      time.Duration
}

func run() error {
	var o options
	flag.StringVar(&o.addr, "addr", "", "ext_authz server, host:port")
	flag.IntVar(&o.conc, "c", 1, "workers issuing calls back to back")
	flag.DurationVar(&o.dur, "d", 10*time.Second, "measured duration")
	flag.DurationVar(&o.warmup, "warmup", 0, "warm-up before measuring (discarded)")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Second, "per-call deadline")
	flag.StringVar(&o.requests, "requests", "", "JSON array of CheckRequests in protojson, cycled (required)")
	flag.StringVar(&o.cert, "cert", "", "client certificate (PEM) for mTLS, with -key and -ca")
	flag.StringVar(&o.key, "key", "", "client private key (PEM)")
	flag.StringVar(&o.ca, "ca", "", "CA bundle the server's certificate must chain to (PEM)")
	flag.StringVar(&o.serverName, "server-name", "", "TLS server name (default: the host of -addr)")
	flag.Parse()
	if o.addr == "" || o.requests == "" || o.conc < 1 || o.dur <= 0 {
		return errors.New("-addr and -requests are required, -c at least 1, -d positive")
	}
	reqs, err := loadRequests(o.requests)
	if err != nil {
		return err
	}
	creds, err := clientCreds(o)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(o.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	cl := authv3.NewAuthorizationClient(conn)
	// The server must answer before measuring starts (counted in
	// "answered").
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	_, err = cl.Check(ctx, reqs[0], grpc.WaitForReady(true))
	cancel()
	if err != nil {
		return fmt.Errorf("first call: %w", err)
	}

	var (
		measuring atomic.Bool
		stop      atomic.Bool
		wg        sync.WaitGroup
		firstErr  atomic.Value
	)
	stats := make([]*workerStats, o.conc)
	for w := range stats {
		st := &workerStats{hist: make([]uint64, 64*subBuckets), min: ^uint64(0)}
		stats[w] = st
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; !stop.Load(); i++ {
				ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
				start := time.Now()
				resp, err := cl.Check(ctx, reqs[i%len(reqs)])
				el := uint64(time.Since(start))
				cancel()
				if err == nil {
					st.sent++
				}
				if !measuring.Load() || stop.Load() {
					continue
				}
				if err != nil {
					st.errors++
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				if resp.GetStatus().GetCode() == int32(codes.OK) {
					st.allowed++
				} else {
					st.denied++
				}
				st.record(el)
			}
		}(w)
	}
	time.Sleep(o.warmup)
	measuring.Store(true)
	begin := time.Now()
	time.Sleep(o.dur)
	stop.Store(true)
	elapsed := time.Since(begin)
	wg.Wait()

	total := &workerStats{hist: make([]uint64, 64*subBuckets), min: ^uint64(0)}
	for _, st := range stats {
		total.merge(st)
	}
	n := total.allowed + total.denied
	out := map[string]any{
		"tool": "authz-load", "target": o.addr, "concurrency": o.conc, "duration_s": elapsed.Seconds(),
		"total": n + total.errors, "errors": total.errors, "allowed": total.allowed, "denied": total.denied,
		"rps": float64(n) / elapsed.Seconds(), "answered": total.sent + 1,
	}
	if n > 0 {
		out["min_us"] = float64(total.min) / 1e3
		out["max_us"] = float64(total.max) / 1e3
		out["mean_us"] = float64(total.sum) / float64(n) / 1e3
		for _, q := range []struct {
			name string
			q    float64
		}{{"p50_us", 0.5}, {"p90_us", 0.9}, {"p99_us", 0.99}, {"p999_us", 0.999}} {
			out[q.name] = total.quantile(q.q) / 1e3
		}
	}
	if e := firstErr.Load(); e != nil {
		out["first_error"] = e
	}
	bs, err := json.Marshal(out)
	if err != nil {
		return err
	}
	fmt.Println(string(bs))
	if n == 0 {
		return errors.New("every call failed")
	}
	return nil
}

func loadRequests(file string) ([]*authv3.CheckRequest, error) {
	bs, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var raws []json.RawMessage
	if err := json.Unmarshal(bs, &raws); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if len(raws) == 0 {
		return nil, fmt.Errorf("%s: no requests", file)
	}
	reqs := make([]*authv3.CheckRequest, len(raws))
	for i, raw := range raws {
		reqs[i] = &authv3.CheckRequest{}
		if err := protojson.Unmarshal(raw, reqs[i]); err != nil {
			return nil, fmt.Errorf("%s: request %d: %w", file, i, err)
		}
	}
	return reqs, nil
}

func clientCreds(o options) (credentials.TransportCredentials, error) {
	if o.cert == "" && o.key == "" && o.ca == "" {
		return insecure.NewCredentials(), nil
	}
	if o.cert == "" || o.key == "" || o.ca == "" {
		return nil, errors.New("mTLS needs -cert, -key and -ca")
	}
	kp, err := tls.LoadX509KeyPair(o.cert, o.key)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(o.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificates", o.ca)
	}
	name := o.serverName
	if name == "" {
		if name, _, err = net.SplitHostPort(o.addr); err != nil {
			return nil, err
		}
	}
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12}), nil
}

// subBuckets per power of two: 2^7, so a bucket is under 1/128 of its value.
const (
	subBits    = 7
	subBuckets = 1 << subBits
)

type workerStats struct {
	hist                    []uint64
	allowed, denied, errors uint64
	min, max, sum           uint64
	// sent counts every call answered, warm-up and tail included: what a
	// decision log should hold a line for.
	sent uint64
}

// bucket of v ns: values under 2*subBuckets have a bucket each; above, a
// power of two 2^k is split into subBuckets equal parts.
func bucket(v uint64) int {
	if v < 2*subBuckets {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1
	return (e+1)*subBuckets + int(v>>e) - subBuckets
}

// bucketValue is the middle of bucket i, in ns.
func bucketValue(i int) float64 {
	if i < 2*subBuckets {
		return float64(i)
	}
	e := i/subBuckets - 1
	m := uint64(i%subBuckets + subBuckets)
	return float64(m<<e) + float64(uint64(1)<<e)/2
}

func (s *workerStats) record(v uint64) {
	s.hist[bucket(v)]++
	s.sum += v
	s.min = min(s.min, v)
	s.max = max(s.max, v)
}

func (s *workerStats) merge(o *workerStats) {
	for i, c := range o.hist {
		s.hist[i] += c
	}
	s.allowed += o.allowed
	s.denied += o.denied
	s.errors += o.errors
	s.sent += o.sent
	s.sum += o.sum
	s.min = min(s.min, o.min)
	s.max = max(s.max, o.max)
}

// quantile q of the recorded values, in ns, clamped to the exact min and max.
func (s *workerStats) quantile(q float64) float64 {
	n := s.allowed + s.denied
	rank := uint64(q*float64(n-1)) + 1
	var seen uint64
	for i, c := range s.hist {
		seen += c
		if seen >= rank {
			return min(max(bucketValue(i), float64(s.min)), float64(s.max))
		}
	}
	return float64(s.max)
}
