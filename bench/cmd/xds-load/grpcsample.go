package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/balancer"
	"google.golang.org/grpc/balancer/roundrobin"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	grpcxds "google.golang.org/grpc/xds"

	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// The proxyless sample: K real grpc-go xDS clients (GENERATOR: grpc), each
// with its own bootstrap and so its own xDS client and ADS stream,
// presenting the simulated Envoys' certificate, each resolving
// xds:///svc-0.bench.svc.cluster.local:8080. What a client sees is what its
// channel balances over: trustmesh's clusters are ROUND_ROBIN, which grpc-go
// turns into xds_wrr_locality over round_robin, and round_robin is built
// here through a wrapper (watchRR) that records the endpoints each update
// hands it, with the time, before passing the update on unchanged. The
// wrapper tells the sample's channels apart by the query of their dial
// target (?sample=I), which the xds resolver ignores (it reads the path)
// and which reaches every balancer in BuildOptions.Target.

func init() {
	balancer.Register(watchRR{Builder: balancer.Get(roundrobin.Name)})
}

// views holds, per sample client, the endpoint sets its round_robin
// balancers were last given and when.
var views = struct {
	sync.Mutex
	m map[string]map[*watchBalancer]view
}{m: map[string]map[*watchBalancer]view{}}

type view struct {
	set string
	at  time.Time
}

type watchRR struct{ balancer.Builder }

func (w watchRR) Build(cc balancer.ClientConn, opts balancer.BuildOptions) balancer.Balancer {
	return &watchBalancer{Balancer: w.Builder.Build(cc, opts), key: opts.Target.URL.Query().Get("sample")}
}

type watchBalancer struct {
	balancer.Balancer
	key string
}

func (b *watchBalancer) UpdateClientConnState(s balancer.ClientConnState) error {
	if b.key != "" {
		var addrs []string
		for _, e := range s.ResolverState.Endpoints {
			for _, a := range e.Addresses {
				addrs = append(addrs, a.Addr)
			}
		}
		if len(s.ResolverState.Endpoints) == 0 {
			for _, a := range s.ResolverState.Addresses {
				addrs = append(addrs, a.Addr)
			}
		}
		views.Lock()
		if views.m[b.key] == nil {
			views.m[b.key] = map[*watchBalancer]view{}
		}
		// at is when the set last changed: a repeated update keeps it.
		if v := (view{set: endpointSet(addrs), at: time.Now()}); views.m[b.key][b].set != v.set {
			views.m[b.key][b] = v
		}
		views.Unlock()
	}
	return b.Balancer.UpdateClientConnState(s)
}

func (b *watchBalancer) Close() {
	views.Lock()
	delete(views.m[b.key], b)
	views.Unlock()
	b.Balancer.Close()
}

// sampleView is what sample client key sees: the endpoint set of its one
// round_robin balancer (svc-0 has one locality), and when it got it.
func sampleView(key string) (view, bool) {
	views.Lock()
	defer views.Unlock()
	if len(views.m[key]) != 1 {
		return view{}, false
	}
	for _, v := range views.m[key] {
		return v, true
	}
	return view{}, false
}

type sample struct {
	dir   string
	conns []*grpc.ClientConn
}

// startSample writes the certificate files the bootstrap's file_watcher
// provider and TLS channel credentials read, and starts k proxyless
// clients of pods grpc-0 … grpc-(k-1).
func startSample(k int, addr string, cert tls.Certificate, rootPEM []byte) (*sample, error) {
	dir, err := os.MkdirTemp("", "xds-load-grpc-")
	if err != nil {
		return nil, fmt.Errorf("xds-load: %w", err)
	}
	s := &sample{dir: dir}
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		s.close()
		return nil, fmt.Errorf("xds-load: %w", err)
	}
	files := map[string]string{
		"certificate_file":    filepath.Join(dir, "cert-chain.pem"),
		"private_key_file":    filepath.Join(dir, "key.pem"),
		"ca_certificate_file": filepath.Join(dir, "root-cert.pem"),
	}
	for name, data := range map[string][]byte{
		files["certificate_file"]: chain, files["private_key_file"]: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}),
		files["ca_certificate_file"]: rootPEM,
	} {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			s.close()
			return nil, fmt.Errorf("xds-load: %w", err)
		}
	}
	provider := map[string]any{"refresh_interval": "600s"}
	for k, v := range files {
		provider[k] = v
	}
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		s.close()
		return nil, fmt.Errorf("xds-load: %w", err)
	}
	for i := range k {
		boot, err := json.Marshal(map[string]any{
			"xds_servers": []any{map[string]any{
				"server_uri":      addr,
				"channel_creds":   []any{map[string]any{"type": "tls", "config": files}},
				"server_features": []any{"xds_v3"},
			}},
			"node": map[string]any{
				"id": fmt.Sprintf("sidecar~10.201.%d.%d~grpc-%d.%s~%s.svc.cluster.local", i/250, i%250, i, meshNS, meshNS),
				"metadata": map[string]any{
					proxyconfig.MetaServiceAccount: "client", proxyconfig.MetaNamespace: meshNS,
					proxyconfig.MetaGenerator: proxyconfig.GeneratorGRPC,
				},
			},
			"certificate_providers": map[string]any{
				proxyconfig.ProxylessCertProvider: map[string]any{"plugin_name": "file_watcher", "config": provider},
			},
		})
		if err != nil {
			s.close()
			return nil, fmt.Errorf("xds-load: %w", err)
		}
		r, err := grpcxds.NewXDSResolverWithConfigForTesting(boot)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("xds-load: proxyless client %d: %w", i, err)
		}
		target := "xds:///" + svc0Target + "?" + url.Values{"sample": {strconv.Itoa(i)}}.Encode()
		// No idle timeout: a channel without calls keeps its xDS watches.
		c, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds), grpc.WithResolvers(r), grpc.WithIdleTimeout(0))
		if err != nil {
			s.close()
			return nil, fmt.Errorf("xds-load: proxyless client %d: %w", i, err)
		}
		s.conns = append(s.conns, c)
		c.Connect()
	}
	return s, nil
}

// wait waits until every sample client sees want, and returns when the
// last of them got it, or what each sees after timeout.
func (s *sample) wait(want string, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		var last time.Time
		ok := true
		var seen []string
		for i := range s.conns {
			v, has := sampleView(strconv.Itoa(i))
			if !has || v.set != want {
				ok = false
			}
			if v.at.After(last) {
				last = v.at
			}
			seen = append(seen, fmt.Sprintf("grpc-%d (%s): [%s]", i, s.conns[i].GetState(), v.set))
		}
		if ok {
			return last, nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("xds-load: after %s the proxyless grpc-go clients do not all see svc-0's endpoints [%s]: %v", timeout, want, seen)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (s *sample) close() {
	for _, c := range s.conns {
		c.Close()
	}
	os.RemoveAll(s.dir)
}
