// Command workload stands in for a workload in the ambient tests: it asks
// the node agent's socket for its X.509 SVIDs with the unchanged go-spiffe
// Workload API client, as any SPIFFE-aware program would, and prints what
// it got as one JSON line on stdout:
//
//	{"pid":123,"ids":["spiffe://…"],"bundles":["cluster.local"]}
//	{"pid":123,"code":"PermissionDenied","error":"…"}
//
// It exits 0 whenever it printed a line, so that a refusal is an answer the
// test reads rather than a failure of the helper.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Result is the line the program prints.
type Result struct {
	PID int `json:"pid"`
	// IDs are the SPIFFE IDs of the SVIDs received, in the order served.
	IDs []string `json:"ids,omitempty"`
	// Serials are the SVIDs' leaf serial numbers (hex), in the same order.
	Serials []string `json:"serials,omitempty"`
	// Bundles are the trust domains of the bundles received, sorted.
	Bundles []string `json:"bundles,omitempty"`
	// Cgroup, Netns and UID say where the process ran: its
	// /proc/self/cgroup, its network namespace and its user.
	Cgroup string `json:"cgroup"`
	Netns  string `json:"netns"`
	UID    int    `json:"uid"`
	// Code is the gRPC code of a refusal ("" when the fetch succeeded).
	Code  string `json:"code,omitempty"`
	Error string `json:"error,omitempty"`
}

func main() {
	socket := flag.String("socket", "", "the node agent's Workload API socket (a path)")
	timeout := flag.Duration("timeout", 20*time.Second, "give up after this long")
	updates := flag.Int("updates", 0, "watch the stream instead, printing a line per update, until this many")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res := Result{PID: os.Getpid(), UID: os.Getuid()}
	if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
		res.Cgroup = string(b)
	}
	res.Netns, _ = os.Readlink("/proc/self/ns/net")
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+*socket))
	if err == nil && *updates > 0 {
		defer c.Close()
		w := &watcher{res: res, left: *updates, cancel: cancel}
		err = c.WatchX509Context(ctx, w)
		if w.left == 0 {
			return
		}
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("%d update(s) short: %w", w.left, ctx.Err())
		}
		res.Code, res.Error = status.Code(err).String(), err.Error()
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
		return
	}
	if err == nil {
		defer c.Close()
		var ctxResp *workloadapi.X509Context
		ctxResp, err = c.FetchX509Context(ctx)
		if err == nil {
			res.fill(ctxResp)
		}
	}
	if err != nil {
		res.Code, res.Error = status.Code(err).String(), err.Error()
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
}

func (r *Result) fill(x *workloadapi.X509Context) {
	for _, s := range x.SVIDs {
		r.IDs = append(r.IDs, s.ID.String())
		r.Serials = append(r.Serials, s.Certificates[0].SerialNumber.Text(16))
	}
	for _, b := range x.Bundles.Bundles() {
		r.Bundles = append(r.Bundles, b.TrustDomain().String())
	}
	sort.Strings(r.Bundles)
}

// watcher prints a line per update, and cancels after the last.
type watcher struct {
	res    Result
	left   int
	cancel context.CancelFunc
}

func (w *watcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	if w.left == 0 {
		return
	}
	r := w.res
	r.fill(x)
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
	if w.left--; w.left == 0 {
		w.cancel()
	}
}

// OnX509ContextWatchError: the client retries; a refusal ends the watch
// through its context, and the line then says why.
func (w *watcher) OnX509ContextWatchError(err error) {
	if status.Code(err) == codes.PermissionDenied {
		r := w.res
		r.Code, r.Error = status.Code(err).String(), err.Error()
		b, _ := json.Marshal(r)
		fmt.Println(string(b))
		w.left = 0
		w.cancel()
	}
}
