package adversary

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestADSFloodDoesNotStarveOthers (class 7): one identity, with one pod in
// the mesh, opens 256 state-of-the-world ADS streams under distinct node
// IDs (its pod's, with ever new IPs, and pods the mesh does not know), then
// 32 delta streams, and never acknowledges anything. A new node of another
// identity still gets its configuration within seconds, and the flooding
// identity holds at most its caps: 8 streams and 4 node IDs.
func TestADSFloodDoesNotStarveOthers(t *testing.T) {
	m, err := meshFiles()
	if err != nil {
		t.Fatal(err)
	}
	s := start(t, serveConfig{mesh: m})
	flood := s.enrol(t, floodID)
	victim := s.enrol(t, victimID)

	const streams, maxStreams, maxNodes = 256, 8, 4
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		node   string
		served bool
		err    error
	}
	// After the state-of-the-world flood, the same identity tries delta
	// streams too: the caps hold across both.
	const deltaStreams = 32
	results := make(chan result, streams+deltaStreams)
	conns := make([]discoveryv3.AggregatedDiscoveryServiceClient, 4)
	for i := range conns {
		conns[i] = discoveryv3.NewAggregatedDiscoveryServiceClient(s.dialGRPC(t, s.ca, flood))
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i := range streams + deltaStreams {
		// The identity's one pod under ever new node IDs (its IP
		// varies), and now and then a pod the mesh does not know.
		n := node("sidecar", fmt.Sprintf("10.3.%d.%d", i/256, i%256), "flood-0", "flood", "flood", nil)
		if i%8 == 0 {
			n = sidecarNode(fmt.Sprintf("fake-%d", i), "flood", "flood")
		}
		c := conns[i%len(conns)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Read the first answer (or the refusal), never acknowledge
			// it.
			var err error
			if i < streams {
				var st discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
				if st, err = c.StreamAggregatedResources(ctx); err == nil {
					_ = st.Send(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: listenerType})
					_, err = st.Recv()
				}
			} else {
				var st discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
				if st, err = c.DeltaAggregatedResources(ctx); err == nil {
					_ = st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: n, TypeUrl: listenerType})
					_, err = st.Recv()
				}
			}
			results <- result{node: n.GetId(), served: err == nil, err: err}
			if err == nil {
				<-ctx.Done()
			}
		}()
		if i == streams-1 {
			// Give the flood a moment to take whatever it can take.
			time.Sleep(2 * time.Second)
		}
	}
	began := time.Now()
	resp, err := fetch(t, s, victim, sidecarNode("victim-0", "victim", "victim"), false, listenerType, nil, 8*time.Second)
	if err != nil || len(resp) == 0 {
		t.Errorf("a new node of another identity got no configuration within 8s of the flood (%v)", err)
	} else {
		t.Logf("the victim got its listeners %s after asking", time.Since(began).Round(time.Millisecond))
	}

	// The flooding identity keeps at most its caps: every other stream is
	// refused.
	refused, servedStreams, served := 0, 0, map[string]bool{}
	settle := time.After(5 * time.Second)
	for refused+servedStreams < streams+deltaStreams {
		select {
		case r := <-results:
			switch {
			case r.served:
				served[r.node] = true
				servedStreams++
			case status.Code(r.err) != codes.Canceled:
				refused++
			}
			continue
		case <-settle:
		}
		break
	}
	if open := streams + deltaStreams - refused; open > maxStreams {
		t.Errorf("%d of %d streams of one identity were kept open, want at most %d", open, streams+deltaStreams, maxStreams)
	}
	if len(served) > maxNodes {
		t.Errorf("%d node IDs of one identity were served, want at most %d", len(served), maxNodes)
	}
}
