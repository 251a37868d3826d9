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
	"google.golang.org/grpc/status"
)

// Result is the line the program prints.
type Result struct {
	PID int `json:"pid"`
	// IDs are the SPIFFE IDs of the SVIDs received, in the order served.
	IDs []string `json:"ids,omitempty"`
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
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res := Result{PID: os.Getpid(), UID: os.Getuid()}
	if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
		res.Cgroup = string(b)
	}
	res.Netns, _ = os.Readlink("/proc/self/ns/net")
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+*socket))
	if err == nil {
		defer c.Close()
		var ctxResp *workloadapi.X509Context
		ctxResp, err = c.FetchX509Context(ctx)
		if err == nil {
			for _, s := range ctxResp.SVIDs {
				res.IDs = append(res.IDs, s.ID.String())
			}
			for _, b := range ctxResp.Bundles.Bundles() {
				res.Bundles = append(res.Bundles, b.TrustDomain().String())
			}
			sort.Strings(res.Bundles)
		}
	}
	if err != nil {
		res.Code, res.Error = status.Code(err).String(), err.Error()
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
}
