package main

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestNoopFloorHoldsAndPushes runs the tool against the no-op floor in
// both modes: every client must enrol, get svc-0's endpoints and follow
// each change round, as against serve, or the floor's figures would not
// be the same fleet's.
func TestNoopFloorHoldsAndPushes(t *testing.T) {
	for _, delta := range []bool{false, true} {
		dir := t.TempDir()
		mesh := filepath.Join(dir, "mesh")
		if err := writeMesh(mesh, 20, 40, 0, 0); err != nil {
			t.Fatal(err)
		}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		caFile := filepath.Join(dir, "ca.pem")
		srv, stopWatch, err := startNoop(mesh, caFile)
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = srv.Serve(lis) }()
		r, err := run(options{meshDir: mesh, addr: lis.Addr().String(), caFile: caFile, token: "floor",
			services: 20, clients: 40, perConn: 2, dialConcurrency: 8, delta: delta, rounds: 2,
			roundTimeout: 20 * time.Second, grpcTimeout: time.Second})
		srv.Stop()
		stopWatch()
		if err != nil {
			t.Fatalf("delta %v: %v", delta, err)
		}
		if len(r.ConvergeS) != 2 || r.StreamsReopened != 0 {
			t.Fatalf("delta %v: %d rounds converged, %d streams reopened; want 2 and 0", delta, len(r.ConvergeS), r.StreamsReopened)
		}
	}
}
