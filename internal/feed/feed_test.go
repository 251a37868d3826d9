package feed_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/internal/feed"
)

// snap is what the fake source's feed publishes: the value read and the
// number of the read that returned it.
type snap struct {
	version uint64
	value   string
	read    int
}

// fakeSource is a source the test drives: set chooses what the next read
// returns and change tells the watch. It logs its watches and reads in
// order, and lets a test end its watch or hold a read.
type fakeSource struct {
	mu      sync.Mutex
	value   string
	err     error
	reads   int
	events  []string
	changed func()
	done    chan error
	ended   chan struct{}
	// hold, when set, is called by a read after it took its number.
	hold func(read int)
}

func newFakeSource(value string) *fakeSource {
	return &fakeSource{value: value, ended: make(chan struct{})}
}

func (s *fakeSource) set(value string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.value, s.err = value, err
}

func (s *fakeSource) change() {
	s.mu.Lock()
	fn := s.changed
	s.mu.Unlock()
	fn()
}

func (s *fakeSource) watch(ctx context.Context, changed func()) (<-chan error, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, "watch")
	s.changed = changed
	s.done = make(chan error, 1)
	done := s.done
	go func() {
		<-ctx.Done()
		close(s.ended)
		done <- nil
	}()
	return done, nil
}

func (s *fakeSource) load(v uint64) (*snap, error) {
	s.mu.Lock()
	s.reads++
	n, value, err, hold := s.reads, s.value, s.err, s.hold
	s.events = append(s.events, "load")
	s.mu.Unlock()
	if hold != nil {
		hold(n)
	}
	if err != nil {
		return nil, err
	}
	return &snap{version: v, value: value, read: n}, nil
}

func (s *fakeSource) readCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reads
}

type fixture struct {
	feed     *feed.Feed[*snap]
	src      *fakeSource
	clock    *clocktesting.FakeClock
	reg      *prometheus.Registry
	refusals chan error
}

const settle = time.Second

func newFixture(t *testing.T, value string) *fixture {
	t.Helper()
	fx := &fixture{
		src:      newFakeSource(value),
		clock:    clocktesting.NewFakeClock(time.Unix(0, 0)),
		reg:      prometheus.NewRegistry(),
		refusals: make(chan error, 16),
	}
	f, err := feed.New(feed.Config[*snap]{
		Watch:   fx.src.watch,
		Load:    fx.src.load,
		Same:    func(cur, next *snap) bool { return cur.value == next.value },
		Refused: func(err error) { fx.refusals <- err },
		Settle:  settle,
		Clock:   fx.clock,
		Errors:  feed.Errors{Watching: "test: watching", Waiting: "test: waiting", Metrics: "test: metrics"},
		Metrics: feed.Metrics{
			Registerer: fx.reg,
			Published:  prometheus.CounterOpts{Name: "test_snapshots_total", Help: "h"},
			Refused:    prometheus.CounterOpts{Name: "test_refusals_total", Help: "h"},
			Version:    prometheus.GaugeOpts{Name: "test_version", Help: "h"},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	fx.feed = f
	return fx
}

// run runs the feed until the test ends, when Run must return nil and have
// ended the source's watch; it returns once the first snapshot is out.
func (fx *fixture) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fx.feed.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		select {
		case <-fx.src.ended:
		default:
			t.Error("the source's watch outlived Run")
		}
	})
	select {
	case <-fx.feed.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("no first snapshot")
	}
}

// reload tells the feed of a change and lets the settle period pass; it
// returns once the feed has read the source again.
func (fx *fixture) reload(t *testing.T) {
	t.Helper()
	reads := fx.src.readCount()
	fx.src.change()
	fx.step(t)
	deadline := time.Now().Add(10 * time.Second)
	for fx.src.readCount() == reads {
		if time.Now().After(deadline) {
			t.Fatal("the feed did not reload after a settled change")
		}
		time.Sleep(time.Millisecond)
	}
}

// step waits for the settle timer, then moves the clock past it.
func (fx *fixture) step(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !fx.clock.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("the feed set no settle timer")
		}
		time.Sleep(time.Millisecond)
	}
	fx.clock.Step(settle)
}

func subscribe(t *testing.T, f *feed.Feed[*snap]) chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ch := make(chan struct{}, 16)
	if _, err := f.Watch(ctx, func() { ch <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	return ch
}

func (fx *fixture) check(t *testing.T, version uint64, value string) *snap {
	t.Helper()
	s := fx.feed.Current()
	if s == nil || s.version != version || s.value != value {
		t.Fatalf("feed on %+v, want version %d holding %q", s, version, value)
	}
	if got := metric(t, fx.reg, "test_version"); got != float64(version) {
		t.Fatalf("version gauge %v, want %d", got, version)
	}
	return s
}

// metric reads the one value of the metric name in reg.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestRunPublishesEachSettledChangeToEverySubscriber(t *testing.T) {
	fx := newFixture(t, "a")
	fx.run(t)
	a, b := subscribe(t, fx.feed), subscribe(t, fx.feed)
	fx.check(t, 1, "a")

	fx.src.set("b", nil)
	fx.reload(t)
	for i, ch := range []chan struct{}{a, b} {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatalf("subscriber %d was not told of the new snapshot", i)
		}
	}
	fx.check(t, 2, "b")
	if got := metric(t, fx.reg, "test_snapshots_total"); got != 2 {
		t.Fatalf("%v snapshots counted, want 2", got)
	}
}

// TestRunSettlesABurst: changes that come before the settle period passes
// are read once, after it.
func TestRunSettlesABurst(t *testing.T) {
	fx := newFixture(t, "a")
	fx.run(t)
	for range 3 {
		fx.src.change()
	}
	time.Sleep(50 * time.Millisecond)
	if n := fx.src.readCount(); n != 1 {
		t.Fatalf("%d reads before the burst settled, want the first load alone", n)
	}
	fx.step(t)
	deadline := time.Now().Add(10 * time.Second)
	for fx.src.readCount() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d reads after the burst settled, want 2", fx.src.readCount())
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if n := fx.src.readCount(); n != 2 {
		t.Fatalf("%d reads after one settled burst, want 2", n)
	}
}

// TestRunWatchesBeforeTheFirstLoad: a change between the first read and
// the watch would be missed, so the watch comes first, and a change made
// during the first load is loaded.
func TestRunWatchesBeforeTheFirstLoad(t *testing.T) {
	fx := newFixture(t, "a")
	fx.src.hold = func(read int) {
		if read == 1 {
			fx.src.set("b", nil)
			fx.src.change()
		}
	}
	fx.run(t)
	fx.src.mu.Lock()
	events := strings.Join(fx.src.events, ",")
	fx.src.mu.Unlock()
	if events != "watch,load" {
		t.Fatalf("the feed did %s, want watch,load", events)
	}
	fx.step(t)
	deadline := time.Now().Add(10 * time.Second)
	for s := fx.feed.Current(); s.value != "b"; s = fx.feed.Current() {
		if time.Now().After(deadline) {
			t.Fatal("the change made during the first load was missed")
		}
		time.Sleep(time.Millisecond)
	}
	fx.check(t, 2, "b")
}

func TestAnUnchangedReloadPublishesNothing(t *testing.T) {
	fx := newFixture(t, "a")
	fx.run(t)
	ch := subscribe(t, fx.feed)
	first := fx.check(t, 1, "a")
	fx.reload(t)
	if s := fx.check(t, 1, "a"); s != first {
		t.Fatal("an unchanged reload replaced the snapshot")
	}
	select {
	case <-ch:
		t.Fatal("a subscriber was told of an unchanged reload")
	case <-time.After(50 * time.Millisecond):
	}
	if got := metric(t, fx.reg, "test_snapshots_total"); got != 1 {
		t.Fatalf("%v snapshots counted, want 1", got)
	}
}

func TestARefusedUpdateKeepsTheLastGoodSnapshot(t *testing.T) {
	fx := newFixture(t, "a")
	fx.run(t)
	ch := subscribe(t, fx.feed)
	first := fx.check(t, 1, "a")
	bad := errors.New("bad")
	fx.src.set("b", bad)
	fx.reload(t)
	select {
	case err := <-fx.refusals:
		if !errors.Is(err, bad) {
			t.Fatalf("refused with %v, want the load's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the refusal was not told")
	}
	if s := fx.check(t, 1, "a"); s != first {
		t.Fatal("a refused update replaced the snapshot")
	}
	if s, err := fx.feed.Load(); s != first || !errors.Is(err, bad) {
		t.Fatalf("Load of a refused update: %v, %v; want the snapshot in force and the error", s, err)
	}
	select {
	case <-ch:
		t.Fatal("a subscriber was told of a refused update")
	default:
	}
	if got := metric(t, fx.reg, "test_refusals_total"); got != 2 {
		t.Fatalf("%v refusals counted, want 2", got)
	}
}

func TestRunFailsWhenTheFirstLoadFails(t *testing.T) {
	fx := newFixture(t, "a")
	bad := errors.New("bad")
	fx.src.set("a", bad)
	if err := fx.feed.Run(context.Background()); !errors.Is(err, bad) {
		t.Fatalf("Run over a bad source: %v, want the load's error", err)
	}
	select {
	case <-fx.src.ended:
	default:
		t.Fatal("the source's watch outlived Run")
	}
	if fx.feed.Current() != nil {
		t.Fatal("a refused first load was published")
	}
	select {
	case <-fx.feed.Ready():
		t.Fatal("Ready after a refused first load")
	default:
	}
}

// TestRunFailsWhenTheWatchEnds: a watch that ends while the feed runs
// would leave every subscriber on a stale snapshot.
func TestRunFailsWhenTheWatchEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"ended", nil, "test: watching: the watch ended"},
		{"failed", errors.New("lost"), "test: watching: lost"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newFixture(t, "a")
			done := make(chan error, 1)
			go func() { done <- fx.feed.Run(context.Background()) }()
			<-fx.feed.Ready()
			fx.src.mu.Lock()
			fx.src.done <- tc.err
			fx.src.mu.Unlock()
			select {
			case err := <-done:
				if err == nil || err.Error() != tc.want || (tc.err != nil && !errors.Is(err, tc.err)) {
					t.Fatalf("Run: %v, want %q", err, tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Run outlived its source's watch")
			}
		})
	}
}

// TestConcurrentLoadsPublishInReadOrder: a Load that read the source
// earlier never publishes its read as a newer version than a Load that read
// it later. The first read is held until the second Load has returned, or
// for a while when Loads are serialized and the second cannot start.
func TestConcurrentLoadsPublishInReadOrder(t *testing.T) {
	fx := newFixture(t, "a")
	secondDone := make(chan struct{})
	fx.src.hold = func(read int) {
		if read == 1 {
			select {
			case <-secondDone:
			case <-time.After(300 * time.Millisecond):
			}
		}
	}
	// Every read returns a new value, so every Load publishes.
	f, err := feed.New(feed.Config[*snap]{
		Watch: fx.src.watch,
		Load: func(v uint64) (*snap, error) {
			s, err := fx.src.load(v)
			if err != nil {
				return nil, err
			}
			s.value = string(rune('a' + s.read%26))
			return s, nil
		},
		Same:   func(cur, next *snap) bool { return cur.read == next.read },
		Settle: settle,
	})
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan *snap, 1)
	go func() {
		s, err := f.Load()
		if err != nil {
			t.Error(err)
		}
		first <- s
	}()
	for fx.src.readCount() < 1 {
		time.Sleep(time.Millisecond)
	}
	second, err := f.Load()
	close(secondDone)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*snap{<-first, second} {
		if s.version != uint64(s.read) {
			t.Errorf("version %d publishes read %d: an older read was published as a newer version", s.version, s.read)
		}
	}
	if cur := f.Current(); cur.read != 2 {
		t.Fatalf("the snapshot in force holds read %d, want the latest, 2", cur.read)
	}

	fx.src.mu.Lock()
	fx.src.hold = nil
	fx.src.mu.Unlock()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				s, err := f.Load()
				if err != nil {
					t.Error(err)
					return
				}
				if s.version != uint64(s.read) {
					t.Errorf("version %d publishes read %d", s.version, s.read)
					return
				}
			}
		}()
	}
	wg.Wait()
	if cur := f.Current(); cur.read != 2+8*25 || cur.version != uint64(cur.read) {
		t.Fatalf("the snapshot in force is version %d of read %d, want the latest, %d", cur.version, cur.read, 2+8*25)
	}
}

func TestWatchBeforeTheFirstSnapshotEndsWithItsContext(t *testing.T) {
	fx := newFixture(t, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := fx.feed.Watch(ctx, func() {})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.HasPrefix(err.Error(), "test: waiting: ") {
		t.Fatalf("Watch with no snapshot and an ended context: %v, want the context's error", err)
	}
}

func TestWatchEndsWithItsContext(t *testing.T) {
	fx := newFixture(t, "a")
	fx.run(t)
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan struct{}, 16)
	done, err := fx.feed.Watch(ctx, func() { ch <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("a watch ended by its context: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a watch outlived its context")
	}
	// A live watch is told once the new snapshot and its gauge are
	// published, which is after the read reload waits for.
	live := make(chan struct{}, 16)
	if _, err := fx.feed.Watch(t.Context(), func() { live <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	fx.src.set("b", nil)
	fx.reload(t)
	select {
	case <-live:
	case <-time.After(10 * time.Second):
		t.Fatal("a live watch was not told of the change")
	}
	fx.check(t, 2, "b")
	select {
	case <-ch:
		t.Fatal("a watch was told of a change after its context ended")
	default:
	}
}

func TestNewRefusesAnIncompleteConfig(t *testing.T) {
	src := newFakeSource("a")
	for name, cfg := range map[string]feed.Config[*snap]{
		"no watch":  {Load: src.load, Settle: settle},
		"no load":   {Watch: src.watch, Settle: settle},
		"no settle": {Watch: src.watch, Load: src.load},
	} {
		if _, err := feed.New(cfg); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	reg := prometheus.NewRegistry()
	cfg := feed.Config[*snap]{
		Watch: src.watch, Load: src.load, Settle: settle,
		Errors: feed.Errors{Metrics: "test: metrics"},
		Metrics: feed.Metrics{
			Registerer: reg,
			Published:  prometheus.CounterOpts{Name: "test_snapshots_total", Help: "h"},
			Refused:    prometheus.CounterOpts{Name: "test_refusals_total", Help: "h"},
			Version:    prometheus.GaugeOpts{Name: "test_version", Help: "h"},
		},
	}
	if _, err := feed.New(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := feed.New(cfg); err == nil || !strings.HasPrefix(err.Error(), "test: metrics: ") {
		t.Fatalf("a second feed on the same metrics: %v, want a metrics error", err)
	}
}

// TestReadyComesAfterPublication: whoever waits on Ready finds the first
// snapshot's metrics and Published hook done. CI once read the version
// gauge between Ready and its Set and saw 0.
func TestReadyComesAfterPublication(t *testing.T) {
	src := newFakeSource("a")
	reg := prometheus.NewRegistry()
	inHook, release := make(chan struct{}), make(chan struct{})
	f, err := feed.New(feed.Config[*snap]{
		Watch: src.watch,
		Load:  src.load,
		Published: func(*snap, uint64) {
			close(inHook)
			<-release
		},
		Settle: settle,
		Clock:  clocktesting.NewFakeClock(time.Unix(0, 0)),
		Errors: feed.Errors{Watching: "test: watching", Waiting: "test: waiting", Metrics: "test: metrics"},
		Metrics: feed.Metrics{
			Registerer: reg,
			Published:  prometheus.CounterOpts{Name: "test_snapshots_total", Help: "h"},
			Refused:    prometheus.CounterOpts{Name: "test_refusals_total", Help: "h"},
			Version:    prometheus.GaugeOpts{Name: "test_version", Help: "h"},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	loaded := make(chan error, 1)
	go func() { _, err := f.Load(); loaded <- err }()
	<-inHook
	if got := metric(t, reg, "test_version"); got != 1 {
		t.Fatalf("version gauge %v inside Published, want 1", got)
	}
	select {
	case <-f.Ready():
		t.Fatal("Ready closed before the Published hook returned")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-loaded; err != nil {
		t.Fatal(err)
	}
	select {
	case <-f.Ready():
	default:
		t.Fatal("Ready not closed after the first Load")
	}
}
