package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/trustmesh/trustmesh/internal/grpclog"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

// agentPackage is the sidecar's agent binary, which the soak's agents run.
const agentPackage = "github.com/trustmesh/trustmesh/cmd/trustmesh-agent"

// result is what one soak counted.
type result struct {
	cfg      config
	elapsed  time.Duration
	setupErr []string
	traffic  counts
	// From the cert dirs and the Workload API of the agents.
	servedExpired, certDirErrors, fetchFailed, fetches int
	agentsExited                                       []string
	// From the agents' metrics and the CA's.
	renewals, renewalFailed, issued, refused float64
	// Rotation.
	prepared, activated, rotationFailed int
	activations                         []time.Time
	intermediates                       map[string]time.Time // serial → first seen in a served chain
	rotationsUnseen                     int
	// Series, sampled every cfg.Sample.
	rss, goroutines                 []point
	rssFlat, goroutinesFlat         flatness
	agentRSS, agentPSS, agentRSSEnd float64
	enrolTime                       time.Duration
	tokenRetries                    int
	journalEntries, journalBytes    float64
	journalVerified                 bool
	journalVerifyErr                string
	issueLatency                    histogram
	journalLatency                  histogram
	journalLatencyName              string
}

// failures lists every must-be-zero figure that is not zero, and growth.
func (r *result) failures() []string {
	var out []string
	out = append(out, r.setupErr...)
	add := func(n int, what string) {
		if n != 0 {
			out = append(out, fmt.Sprintf("%d %s (must be 0)", n, what))
		}
	}
	add(r.traffic.handshakeFailed, "failed mTLS handshakes or exchanges")
	add(r.traffic.callFailed, "failed gRPC calls (neither allowed nor denied)")
	add(r.traffic.wrong, "gRPC calls decided against the policy in force")
	add(int(r.renewalFailed), "failed renewals (agents' trustmesh_agent_rotation_failures_total)")
	add(int(r.refused), "requests the CA refused (trustmesh_ca_refused_total)")
	add(r.traffic.expired+r.servedExpired, "certificates served or presented outside their validity")
	add(r.certDirErrors, "unreadable cert dirs")
	add(r.fetchFailed, "failed Workload API fetches")
	add(len(r.agentsExited), "agents that exited")
	add(r.rotationFailed, "failed `trustmesh ca rotate` steps")
	add(r.rotationsUnseen, "activated intermediates never seen in a served chain within the bound")
	if !r.journalVerified {
		out = append(out, "audit verify did not pass: "+r.journalVerifyErr)
	}
	if r.traffic.calls == 0 || r.traffic.handshakes == 0 {
		out = append(out, fmt.Sprintf("no traffic: %d gRPC calls, %d handshakes", r.traffic.calls, r.traffic.handshakes))
	}
	if r.cfg.CheckFlat {
		for _, f := range []struct {
			name string
			f    flatness
		}{{"control-plane RSS", r.rssFlat}, {"control-plane goroutines", r.goroutinesFlat}} {
			if f.f.undecided || !f.f.flat {
				out = append(out, fmt.Sprintf("%s is not shown flat", f.name))
			}
		}
	}
	return out
}

// soak is one run in progress.
type soak struct {
	cfg      config
	out      io.Writer
	bin      string
	agentBin string
	work     string
	dataDir  string
	caAddr   string
	monAddr  string
	serve    *proc
	agents   []*agent
	pairs    []*grpcPair
	probes   []probePair
	policies *policyClock
	traffic  *counts
	start    time.Time

	mu  sync.Mutex
	res *result
	// seenLeaf is the leaf serials already counted as expired.
	seenLeaf map[string]bool
	// last report's CA histograms, for per-interval quantiles.
	lastIssue, lastJournal histogram
}

// run sets the soak up, runs it for cfg.Duration and tears it down. An
// error is a soak that could not be set up; what the soak found is in the
// result.
func run(ctx context.Context, cfg config, out io.Writer) (*result, error) {
	s := &soak{cfg: cfg, out: out, policies: &policyClock{}, traffic: &counts{},
		res: &result{cfg: cfg, intermediates: map[string]time.Time{}}, seenLeaf: map[string]bool{}}
	var err error
	// A short directory: unix socket paths are limited to 108 bytes.
	if s.work, err = os.MkdirTemp("", "tm-soak"); err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	if !cfg.Keep {
		defer os.RemoveAll(s.work)
	} else {
		fmt.Fprintf(out, "work directory (kept): %s\n", s.work)
	}
	if s.bin = cfg.Binary; s.bin == "" {
		if s.bin, err = binary.BuildTrustmesh(s.work, "TRUSTMESH_SOAK_BINARY"); err != nil {
			return nil, fmt.Errorf("soak: %w", err)
		}
	}
	if s.agentBin = cfg.AgentBinary; s.agentBin == "" {
		if s.agentBin, err = binary.Build(s.work, agentPackage); err != nil {
			return nil, fmt.Errorf("soak: %w", err)
		}
	}
	// grpc-go's logs (the workloads' xDS clients and servers) go to a
	// file of the work directory, not between the figures.
	grpcLog, err := os.Create(filepath.Join(s.work, "grpc.log"))
	if err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	defer grpcLog.Close()
	grpclog.Install(slog.New(slog.NewTextHandler(grpcLog, nil)))
	defer s.teardown()
	if err := s.setup(ctx); err != nil {
		return nil, err
	}
	s.loop(ctx)
	s.finish(ctx)
	return s.res, nil
}

func (s *soak) setup(ctx context.Context) error {
	cfg := s.cfg
	if err := checkInotify(cfg.Agents); err != nil {
		return err
	}
	s.dataDir = filepath.Join(s.work, "data")
	meshDir, policyDir := filepath.Join(s.work, "mesh"), filepath.Join(s.work, "policies")
	if err := mkdirs(meshDir, policyDir, filepath.Join(s.work, "agents")); err != nil {
		return err
	}
	var err error
	var authzAddr string
	for _, a := range []*string{&s.caAddr, &s.monAddr, &authzAddr} {
		if *a, err = freeAddr(); err != nil {
			return err
		}
	}
	// The agents: the pairs' workloads first, then the rest.
	names := make([]string, 0, cfg.Agents)
	for i := range cfg.Pairs {
		names = append(names, fmt.Sprintf("echo-%d", i), fmt.Sprintf("client-%d", i))
	}
	for j := range cfg.Probes {
		names = append(names, fmt.Sprintf("probe-server-%d", j), fmt.Sprintf("probe-client-%d", j))
	}
	for k := len(names); k < cfg.Agents; k++ {
		names = append(names, fmt.Sprintf("agent-%d", k))
	}
	for i, name := range names {
		dir := filepath.Join(s.work, "agents", fmt.Sprint(i))
		mon, err := freeAddr()
		if err != nil {
			return err
		}
		s.agents = append(s.agents, &agent{index: i, id: workloadID(name), dir: dir,
			socket: filepath.Join(dir, "s"), certDir: filepath.Join(dir, "certs"), monitor: mon})
	}
	for i := range cfg.Pairs {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return fmt.Errorf("soak: %w", err)
		}
		s.pairs = append(s.pairs, &grpcPair{index: i, server: s.agents[2*i], client: s.agents[2*i+1],
			port: lis.Addr().(*net.TCPAddr).Port, lis: lis})
	}
	for j := range cfg.Probes {
		s.probes = append(s.probes, probePair{server: s.agents[2*cfg.Pairs+2*j], client: s.agents[2*cfg.Pairs+2*j+1]})
	}
	if err := os.WriteFile(filepath.Join(meshDir, "mesh.yaml"), []byte(meshYAML(s.pairs)), 0o600); err != nil {
		return fmt.Errorf("soak: %w", err)
	}
	if err := s.writePolicies(policyDir, 0); err != nil {
		return err
	}

	ttl := cfg.CertTTL.String()
	s.serve, err = startProc("serve", s.bin, filepath.Join(s.work, "serve.log"), "serve",
		"--data-dir", s.dataDir, "--kubernetes", "off",
		"--listen-ca", s.caAddr, "--listen-monitoring", s.monAddr, "--listen-authz", authzAddr,
		"--listen-bundle", "", "--listen-ui", "off", "--listen-injector", "off",
		"--mesh", meshDir, "--policies", policyDir, "--decision-log", "",
		"--min-workload-ttl", ttl, "--default-workload-ttl", ttl, "--manual-ca-rotation")
	if err != nil {
		return err
	}
	if err := waitOK(ctx, s.serve, "http://"+s.monAddr+"/readyz", 2*time.Minute); err != nil {
		return err
	}
	bundle, err := trustmeshCmd(ctx, s.bin, "ca", "bundle", "--data-dir", s.dataDir)
	if err != nil {
		return err
	}
	bundleFile := filepath.Join(s.work, "ca.pem")
	if err := os.WriteFile(bundleFile, bundle, 0o600); err != nil {
		return fmt.Errorf("soak: %w", err)
	}

	// Enrol every agent: a join token each, then the process.
	began := time.Now()
	err = parallel(len(s.agents), 4, func(i int) error {
		a := s.agents[i]
		if err := mkdirs(a.dir); err != nil {
			return err
		}
		// ca token create beside a busy serve can meet SQLite's lock
		// (SQLITE_BUSY): the operator's answer is to run it again, which
		// the soak does, up to 10 times, and counts.
		var tok []byte
		var err error
		for try := 0; ; try++ {
			tok, err = trustmeshCmd(ctx, s.bin, "ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", a.id, "--ttl", "1h")
			if err == nil || try == 10 || !strings.Contains(err.Error(), "SQLITE_BUSY") {
				break
			}
			s.mu.Lock()
			s.res.tokenRetries++
			s.mu.Unlock()
			if err := sleep(ctx, time.Duration(try+1)*200*time.Millisecond); err != nil {
				return err
			}
		}
		if err != nil {
			return err
		}
		tokenFile := filepath.Join(a.dir, "join-token")
		if err := os.WriteFile(tokenFile, tok, 0o600); err != nil {
			return fmt.Errorf("soak: %w", err)
		}
		a.proc, err = startProc(a.id, s.agentBin, filepath.Join(a.dir, "agent.log"),
			"--ca-address", s.caAddr, "--ca-bundle", bundleFile, "--join-token-file", tokenFile,
			"--socket", a.socket, "--cert-dir", a.certDir, "--listen-monitoring", a.monitor, "--cert-ttl", ttl)
		return err
	})
	if err != nil {
		return err
	}
	deadline := time.Now().Add(2*time.Minute + time.Duration(len(s.agents))*500*time.Millisecond)
	for _, a := range s.agents {
		for {
			if _, err := os.Stat(filepath.Join(a.certDir, "cert-chain.pem")); err == nil {
				break
			}
			if a.proc.exited() {
				return fmt.Errorf("soak: agent %s exited (%v) before its first certificate:\n%s", a.id, a.proc.err, a.proc.tail(4096))
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("soak: agent %s has no certificate after %s:\n%s", a.id, time.Since(began).Round(time.Second), a.proc.tail(4096))
			}
			if err := sleep(ctx, 100*time.Millisecond); err != nil {
				return err
			}
		}
	}
	s.res.enrolTime = time.Since(began)
	for _, a := range s.agents {
		if v, err := rss(a.proc.cmd.Process.Pid); err == nil {
			s.res.agentRSS += v
		}
		if v, err := pss(a.proc.cmd.Process.Pid); err == nil {
			s.res.agentPSS += v
		}
	}
	cpRSS, _ := rss(s.serve.cmd.Process.Pid)
	fmt.Fprintf(s.out, "soak: %d agents enrolled in %s (join token, %s certificates); agents' total RSS %s (%s each on average), total PSS %s (shared pages split among the processes that map them); control plane RSS %s\n",
		len(s.agents), s.res.enrolTime.Round(100*time.Millisecond), cfg.CertTTL, mib(s.res.agentRSS),
		mib(s.res.agentRSS/float64(len(s.agents))), mib(s.res.agentPSS), mib(cpRSS))
	fmt.Fprintf(s.out, "soak: ca token create met SQLITE_BUSY and was run again %d times\n", s.res.tokenRetries)
	fmt.Fprintf(s.out, "soak: %d proxyless gRPC pairs, %d mTLS probe pairs; policies rewritten every %s (calls within %s of a rewrite not judged); intermediate rotated every %s; running %s\n",
		cfg.Pairs, cfg.Probes, cfg.PolicyEvery, cfg.Propagation, cfg.RotateEvery, cfg.Duration)
	return nil
}

// inotifyHeadroom is the inotify instances left, besides one per agent,
// for serve (its mesh and policy watchers), grpc-go's certificate
// watchers and whatever else the user runs.
const inotifyHeadroom = 64

// checkInotify refuses a soak that the kernel's per-user limit on inotify
// instances would cut short: every agent holds one (it watches its socket's
// directory), and one past the limit exits at start.
func checkInotify(agents int) error {
	b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_instances")
	if err != nil {
		return nil // not Linux's procfs: let the agents say
	}
	limit, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return nil
	}
	if need := agents + inotifyHeadroom; limit < need {
		return fmt.Errorf("soak: fs.inotify.max_user_instances is %d; %d agents need about %d (one each, and %d for the rest): raise it (hack/soak.sh does so as root, for the run)",
			limit, agents, need, inotifyHeadroom)
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func (s *soak) writePolicies(dir string, phase int) error {
	if err := writeAtomic(filepath.Join(dir, "policies.yaml"), s.work, []byte(policyYAML(s.pairs, phase))); err != nil {
		return err
	}
	s.policies.record(time.Now(), phase)
	return nil
}

// loop runs the traffic and the operator for cfg.Duration.
func (s *soak) loop(ctx context.Context) {
	cfg := s.cfg
	tctx, cancel := context.WithCancel(ctx)
	var stops []func()
	defer func() {
		cancel()
		for _, stop := range stops {
			stop()
		}
		s.res.traffic = s.traffic.snapshot()
	}()
	for _, p := range s.pairs {
		stop, err := servePair(p, s.caAddr)
		if err != nil {
			s.res.setupErr = append(s.res.setupErr, err.Error())
			return
		}
		stops = append(stops, stop)
		stop, err = callPair(tctx, p, s.caAddr, s.policies, cfg.Propagation, s.traffic)
		if err != nil {
			s.res.setupErr = append(s.res.setupErr, err.Error())
			return
		}
		stops = append(stops, stop)
	}
	for _, p := range s.probes {
		stop, err := runProbe(tctx, p, s.traffic)
		if err != nil {
			s.res.setupErr = append(s.res.setupErr, err.Error())
			return
		}
		stops = append(stops, stop)
	}

	s.start = time.Now()
	end := time.NewTimer(cfg.Duration)
	defer end.Stop()
	sample := time.NewTicker(cfg.Sample)
	defer sample.Stop()
	report := time.NewTicker(cfg.ReportEvery)
	defer report.Stop()
	policy := time.NewTicker(cfg.PolicyEvery)
	defer policy.Stop()
	var rotate <-chan time.Time
	if cfg.RotateEvery > 0 {
		t := time.NewTicker(cfg.RotateEvery / 2)
		defer t.Stop()
		rotate = t.C
	}
	phase, prepared := 0, false
	s.sample(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-end.C:
			s.sample(ctx) // the last sample, under traffic
			return
		case <-sample.C:
			s.sample(ctx)
		case <-report.C:
			s.report(ctx, false)
		case <-policy.C:
			phase++
			if err := s.writePolicies(filepath.Join(s.work, "policies"), phase); err != nil {
				s.res.setupErr = append(s.res.setupErr, err.Error())
			}
		case <-rotate:
			step := "--prepare"
			if prepared {
				step = "--activate"
			}
			_, err := trustmeshCmd(ctx, s.bin, "ca", "rotate", step, "--data-dir", s.dataDir)
			s.mu.Lock()
			switch {
			case err != nil:
				s.res.rotationFailed++
				fmt.Fprintf(s.out, "soak: %v\n", err)
			case prepared:
				s.res.activated++
				s.res.activations = append(s.res.activations, time.Now())
				prepared = false
			default:
				s.res.prepared++
				prepared = true
			}
			s.mu.Unlock()
		}
	}
}

// sample reads the control plane's RSS and goroutines, every agent's
// cert dir and a sample of agents' Workload API.
func (s *soak) sample(ctx context.Context) {
	at := time.Since(s.start)
	now := time.Now()
	if v, err := rss(s.serve.cmd.Process.Pid); err == nil {
		s.res.rss = append(s.res.rss, point{at, v})
	}
	if m, err := scrape(ctx, s.monAddr); err == nil {
		if g, ok := m["go_goroutines"][""]; ok {
			s.res.goroutines = append(s.res.goroutines, point{at, g})
		}
	}
	for _, a := range s.agents {
		if a.proc.exited() {
			continue
		}
		chain, err := readChain(filepath.Join(a.certDir, "cert-chain.pem"))
		if err != nil {
			s.res.certDirErrors++
			s.traffic.mu.Lock()
			s.traffic.example("cert dir of %s: %v", a.id, err)
			s.traffic.mu.Unlock()
			continue
		}
		s.checkServed("cert dir", a, chain, now)
	}
	// The Workload API of about 8 agents, spread over all of them.
	step := max(1, len(s.agents)/8)
	for i := 0; i < len(s.agents); i += step {
		a := s.agents[i]
		fctx, cancel := context.WithTimeout(ctx, callTimeout)
		svid, err := workloadapi.FetchX509SVID(fctx, workloadapi.WithAddr("unix://"+a.socket))
		cancel()
		s.res.fetches++
		if err != nil {
			if ctx.Err() == nil {
				s.res.fetchFailed++
				s.traffic.mu.Lock()
				s.traffic.example("Workload API of %s: %v", a.id, err)
				s.traffic.mu.Unlock()
			}
			continue
		}
		s.checkServed("Workload API", a, svid.Certificates, time.Now())
	}
}

// checkServed counts a served chain whose leaf or intermediate is outside
// its validity at now (each leaf once), and notes its intermediate.
func (s *soak) checkServed(where string, a *agent, chain []*x509.Certificate, now time.Time) {
	leaf := chain[0]
	key := a.id + "/" + leaf.SerialNumber.Text(16)
	for i, c := range chain {
		if (now.Before(c.NotBefore) || !now.Before(c.NotAfter)) && !s.seenLeaf[key] {
			s.seenLeaf[key] = true
			s.res.servedExpired++
			s.traffic.mu.Lock()
			s.traffic.example("%s of %s serves chain[%d] serial %s valid %s to %s", where, a.id, i,
				c.SerialNumber.Text(16), c.NotBefore.Format(time.RFC3339), c.NotAfter.Format(time.RFC3339))
			s.traffic.mu.Unlock()
		}
	}
	if len(chain) > 1 {
		k := chain[1].SerialNumber.Text(16)
		if _, ok := s.res.intermediates[k]; !ok {
			s.res.intermediates[k] = now
		}
	}
}

// agentTotals scrapes every agent's renewals and renewal failures.
func (s *soak) agentTotals(ctx context.Context) (renewals, failed float64, unreachable int) {
	var mu sync.Mutex
	_ = parallel(len(s.agents), 8, func(i int) error {
		m, err := scrape(ctx, s.agents[i].monitor)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			unreachable++
			return nil
		}
		renewals += m.sum("trustmesh_agent_rotations_total")
		failed += m.sum("trustmesh_agent_rotation_failures_total")
		return nil
	})
	return renewals, failed, unreachable
}

// journal reads the journal's entries (audit verify, which also checks
// it against its checkpoints) and its files' size.
func (s *soak) journal(ctx context.Context) (entries, bytes float64, err error) {
	out, err := trustmeshCmd(ctx, s.bin, "audit", "verify", "--data-dir", s.dataDir, "-o", "json")
	if err == nil {
		var rep struct{ Entries float64 }
		if jerr := json.Unmarshal(out, &rep); jerr != nil {
			err = fmt.Errorf("soak: audit verify -o json: %w", jerr)
		}
		entries = rep.Entries
	}
	files, _ := filepath.Glob(filepath.Join(s.dataDir, "journal.db*"))
	for _, f := range files {
		if fi, serr := os.Stat(f); serr == nil {
			bytes += float64(fi.Size())
		}
	}
	return entries, bytes, err
}

// journalHistogram finds the CA's histogram of journal appends, if it
// exports one: the first family with "journal" and "append" in its name.
func journalHistogram(m metrics) string {
	var names []string
	for name := range m {
		if base, ok := strings.CutSuffix(name, "_bucket"); ok && strings.Contains(base, "journal") && strings.Contains(base, "append") {
			names = append(names, base)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return ""
	}
	return names[0]
}

// report prints one line of figures; final prints the whole run's.
func (s *soak) report(ctx context.Context, final bool) {
	renewals, rfailed, unreachable := s.agentTotals(ctx)
	if !final || unreachable == 0 {
		s.res.renewals, s.res.renewalFailed = renewals, rfailed
	}
	var issueQ, journalQ string
	if m, err := scrape(ctx, s.monAddr); err == nil {
		s.res.issued = m.sum("trustmesh_ca_issued_total")
		s.res.refused = m.sum("trustmesh_ca_refused_total")
		h := m.histogramOf("trustmesh_ca_request_duration_seconds", `outcome="issued"`)
		d := h.minus(s.lastIssue)
		s.lastIssue, s.res.issueLatency = h, h
		issueQ = fmt.Sprintf("issuance latency p50<=%s p99<=%s (%.0f)", seconds(d.quantile(0.5)), seconds(d.quantile(0.99)), d.total())
		if name := journalHistogram(m); name != "" {
			jh := m.histogramOf(name)
			jd := jh.minus(s.lastJournal)
			s.lastJournal, s.res.journalLatency, s.res.journalLatencyName = jh, jh, name
			journalQ = fmt.Sprintf(" | journal append p50<=%s p99<=%s p99.9<=%s (%.0f)",
				seconds(jd.quantile(0.5)), seconds(jd.quantile(0.99)), seconds(jd.quantile(0.999)), jd.total())
		} else {
			journalQ = " | journal append: not exported"
		}
	}
	entries, bytes, jerr := s.journal(ctx)
	s.res.journalEntries, s.res.journalBytes = entries, bytes
	if final {
		s.res.journalVerified, s.res.journalVerifyErr = jerr == nil, fmt.Sprint(jerr)
	} else if jerr != nil {
		fmt.Fprintf(s.out, "soak: %v\n", jerr)
	}
	var agentRSS float64
	alive := 0
	for _, a := range s.agents {
		if !a.proc.exited() {
			alive++
			if v, err := rss(a.proc.cmd.Process.Pid); err == nil {
				agentRSS += v
			}
		}
	}
	s.res.agentRSSEnd = agentRSS
	t := s.traffic.snapshot()
	last := func(ps []point) float64 {
		if len(ps) == 0 {
			return math.NaN()
		}
		return ps[len(ps)-1].v
	}
	s.mu.Lock()
	rot := fmt.Sprintf("rotation: prepared %d activated %d failed %d, %d intermediates seen", s.res.prepared, s.res.activated, s.res.rotationFailed, len(s.res.intermediates))
	s.mu.Unlock()
	fmt.Fprintf(s.out, "[%8s] agents %d/%d up (RSS %s) | renewals %.0f failed %.0f | CA issued %.0f refused %.0f | handshakes %d failed %d | gRPC calls %d (ok %d denied %d) failed %d wrong %d, slowest policy switch %s | served expired %d | cert-dir errors %d, Workload API fetches %d failed %d | control plane RSS %s goroutines %.0f | journal %.0f entries, %s on disk | %s%s | %s\n",
		time.Since(s.start).Round(time.Second), alive, len(s.agents), mib(agentRSS), renewals, rfailed, s.res.issued, s.res.refused,
		t.handshakes, t.handshakeFailed, t.calls, t.ok, t.denied, t.callFailed, t.wrong, t.maxPropagation.Round(time.Millisecond),
		t.expired+s.res.servedExpired, s.res.certDirErrors, s.res.fetches, s.res.fetchFailed,
		mib(last(s.res.rss)), last(s.res.goroutines), entries, mib(bytes), issueQ, journalQ, rot)
}

// finish takes the last figures, judges them and prints the summary.
func (s *soak) finish(ctx context.Context) {
	cfg := s.cfg
	s.res.elapsed = time.Since(s.start)
	for _, a := range s.agents {
		if a.proc.exited() {
			s.res.agentsExited = append(s.res.agentsExited, fmt.Sprintf("%s: %v", a.id, a.proc.err))
		}
	}
	s.report(ctx, true)
	s.res.rssFlat = judgeFlat(s.res.rss, s.res.elapsed, cfg.FlatFraction, cfg.FlatRSSFloor)
	s.res.goroutinesFlat = judgeFlat(s.res.goroutines, s.res.elapsed, cfg.FlatFraction, cfg.FlatGoroutineFloor)
	// An activation is seen once an intermediate first appears in a
	// served chain after it. The bound: serve applies it within its
	// reload interval, and every agent renews within half its
	// certificate's life after that; two samples of slack.
	bound := cfg.ReloadInterval + cfg.CertTTL/2 + 2*cfg.Sample
	endAt := time.Now()
	var firsts []time.Time
	for _, at := range s.res.intermediates {
		firsts = append(firsts, at)
	}
	sort.Slice(firsts, func(i, j int) bool { return firsts[i].Before(firsts[j]) })
	due, seenAfter := 0, 0
	for _, a := range s.res.activations {
		if endAt.Sub(a) >= bound {
			due++
		}
	}
	if len(s.res.activations) > 0 {
		for _, f := range firsts {
			if f.After(s.res.activations[0]) {
				seenAfter++
			}
		}
	}
	if due > seenAfter {
		s.res.rotationsUnseen = due - seenAfter
	}

	r := s.res
	w := s.out
	fmt.Fprintf(w, "\n=== soak summary after %s ===\n", r.elapsed.Round(time.Second))
	fmt.Fprintf(w, "agents: %d, enrolled in %s, total RSS %s (PSS %s) after enrolment, RSS %s at the end; %d exited\n", len(s.agents),
		r.enrolTime.Round(100*time.Millisecond), mib(r.agentRSS), mib(r.agentPSS), mib(r.agentRSSEnd), len(r.agentsExited))
	fmt.Fprintf(w, "renewals: %.0f, failed %.0f; CA issued %.0f, refused %.0f\n", r.renewals, r.renewalFailed, r.issued, r.refused)
	fmt.Fprintf(w, "mTLS probe handshakes: %d, failed %d\n", r.traffic.handshakes, r.traffic.handshakeFailed)
	fmt.Fprintf(w, "gRPC calls: %d (ok %d, denied %d, not judged %d), failed %d, decided against the policy in force %d; slowest switch after a rewrite %s\n",
		r.traffic.calls, r.traffic.ok, r.traffic.denied, r.traffic.unjudged, r.traffic.callFailed, r.traffic.wrong, r.traffic.maxPropagation.Round(time.Millisecond))
	fmt.Fprintf(w, "certificates served or presented outside their validity: %d (cert dirs of every agent and %d Workload API fetches every %s, and every probe handshake); cert-dir errors %d, fetches failed %d\n",
		r.traffic.expired+r.servedExpired, r.fetches, cfg.Sample, r.certDirErrors, r.fetchFailed)
	fmt.Fprintf(w, "rotation: %d prepared, %d activated, %d failed steps; %d intermediates seen in served chains; %d activations older than %s not seen\n",
		r.prepared, r.activated, r.rotationFailed, len(r.intermediates), r.rotationsUnseen, bound)
	fmt.Fprintf(w, "journal: %.0f entries, %s on disk; audit verify passed: %v\n", r.journalEntries, mib(r.journalBytes), r.journalVerified)
	fmt.Fprintf(w, "issuance latency (trustmesh_ca_request_duration_seconds{outcome=\"issued\"}, includes the journal append), whole run: p50<=%s p99<=%s p99.9<=%s over %.0f\n",
		seconds(r.issueLatency.quantile(0.5)), seconds(r.issueLatency.quantile(0.99)), seconds(r.issueLatency.quantile(0.999)), r.issueLatency.total())
	if r.journalLatencyName != "" {
		fmt.Fprintf(w, "journal append latency (%s), whole run: p50<=%s p99<=%s p99.9<=%s over %.0f\n", r.journalLatencyName,
			seconds(r.journalLatency.quantile(0.5)), seconds(r.journalLatency.quantile(0.99)), seconds(r.journalLatency.quantile(0.999)), r.journalLatency.total())
	} else {
		fmt.Fprintln(w, "journal append latency: the CA exports no journal-append histogram; issuance latency above bounds it")
	}
	fmt.Fprintln(w, "control plane over time (offset, RSS, goroutines):")
	every := max(1, int(cfg.ReportEvery/cfg.Sample))
	for i := 0; i < len(r.rss); i += every {
		g := math.NaN()
		if i < len(r.goroutines) {
			g = r.goroutines[i].v
		}
		fmt.Fprintf(w, "  %8s  %10s  %6.0f\n", r.rss[i].at.Round(time.Second), mib(r.rss[i].v), g)
	}
	fmt.Fprintf(w, "control plane RSS: %s\n", r.rssFlat.String(mib))
	fmt.Fprintf(w, "control plane goroutines: %s\n", r.goroutinesFlat.String(count))
	if ex := r.traffic.examples; len(ex) > 0 {
		fmt.Fprintln(w, "first failures:")
		for _, e := range ex {
			fmt.Fprintln(w, "  ", e)
		}
	}
}

// teardown stops the agents, then serve.
func (s *soak) teardown() {
	_ = parallel(len(s.agents), 16, func(i int) error {
		if p := s.agents[i].proc; p != nil {
			p.stop(10 * time.Second)
		}
		return nil
	})
	if s.serve != nil {
		s.serve.stop(30 * time.Second)
	}
	for _, p := range s.pairs {
		p.lis.Close()
	}
}
