# trustmesh — build, test and benchmark.
GO ?= go

.PHONY: all build test bench soak envtest otelcol proto generate-check

all: build

# bin/trustmesh, and bin/trustmesh-agent: the agent alone, which injected
# pods run. Both are stripped; the agent must stay under 40 MiB.
AGENT_MAX_BYTES := 41943040
build:
	$(GO) build -ldflags='-s -w' -o bin/trustmesh ./cmd/trustmesh
	$(GO) build -ldflags='-s -w' -o bin/trustmesh-agent ./cmd/trustmesh-agent
	@size=$$(wc -c < bin/trustmesh-agent) && [ "$$size" -lt $(AGENT_MAX_BYTES) ] || \
	{ echo "bin/trustmesh-agent is $$size bytes, over the sidecar's $(AGENT_MAX_BYTES)"; exit 1; }

# The real kube-apiserver and etcd that the Kubernetes tests run against,
# built from source once into a cache (about 13 minutes cold, seconds warm).
envtest:
	@hack/envtest-assets.sh >/dev/null

# The OpenTelemetry Collector that test/tracing exports spans to, built with
# the collector builder from hack/otelcol/manifest.yaml once into a cache
# keyed by the builder, the manifest and Go (about 4 minutes cold).
otelcol:
	@hack/otelcol.sh >/dev/null

# Every test, with the race detector, against real components: a real
# kube-apiserver and etcd, and a PostgreSQL started on loopback for the run
# (test/readme runs the README's commands, openssl among them).
# Under -race, the symbolic proofs and the admission corpus check only a
# sample (the race detector finds nothing in them and slows them tenfold):
# they run whole once more without it.
# Then the PKCS#11 back end (-tags pkcs11, cgo) against a SoftHSM token that
# hack/softhsm.sh creates (installing Debian's softhsm2 when it is missing).
# First, the committed generated files must be current (about 6 s warm).
# test/witness-oracle, a module of its own, checks the journal's checkpoints,
# cosignatures and tlog-witness client against torchwood and
# transparency-dev/formats, which the main module does not depend on.
# The browser tests (test/browser) drive Debian's chromium, installed when
# missing, and inject axe-core, which npm ci installs from its lock file
# through npm's cache; under make test they fail, never skip, without them.
# test/tracing exports spans to a real OpenTelemetry Collector (make otelcol),
# named by TRUSTMESH_OTELCOL; with TRUSTMESH_TRACING_TESTS=1 it fails, never
# skips, without one, and a failing hack/otelcol.sh stops the run.
# TEST_PARALLEL test binaries run at once (go test -p): 4, or one per CPU on
# machines with more. Many packages wait on real clocks (rotations,
# certificate lifetimes, time-outs), and with go's default of one per CPU
# their waits left cores idle. On 2 cores, warm, make test took 16 min 32 s
# with 2; with 4, 11 to 14 minutes over four runs, using 85% of both cores.
TEST_PARALLEL ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && echo "$$n" || echo 4)
test: envtest otelcol generate-check
	@hack/debian-tools.sh openssl chromium npm iptables ip6tables=iptables tcpdump ip=iproute2 nsenter=util-linux curl
	@cd test/browser && npm ci --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null
	@otelcol=$$(hack/otelcol.sh) && dsn=$$(hack/postgres.sh start) && trap 'hack/postgres.sh stop' EXIT && \
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" TRUSTMESH_TEST_POSTGRES_DSN="$$dsn" TRUSTMESH_BROWSER_TESTS=1 \
	TRUSTMESH_OTELCOL="$$otelcol" TRUSTMESH_TRACING_TESTS=1 \
	$(GO) test -race -count=1 -p $(TEST_PARALLEL) -timeout 20m ./...
	GO="$(GO)" hack/go-test-named.sh 'TestProofsHoldInTheEngine TestCorpusAgrees TestCaseFilesAgree' ./authz/symbolic ./admission
	@env=$$(hack/softhsm.sh start) && eval "$$env" && trap 'hack/softhsm.sh stop "$$TRUSTMESH_SOFTHSM_DIR"' EXIT && \
	CGO_ENABLED=1 $(GO) test -tags pkcs11 -count=1 ./ca/authority/
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') && \
	echo "istio-oracle: fresh seed $$seed" && \
	{ (cd test/istio-oracle && $(GO) vet ./... && $(GO) run . -seed "$$seed" -cases 10000 -out "$$tmp/corpus.jsonl.gz") || \
	{ echo "istio-oracle: the oracle module did not build or run (see above)"; exit 1; }; } && \
	TRUSTMESH_ORACLE_CORPUS="$$tmp/corpus.jsonl.gz" $(GO) test -count=1 -run '^TestIstioOracle$$' ./authz/conformance || \
	{ echo "istio-oracle: disagreements with fresh seed $$seed"; exit 1; }
	@(cd test/witness-oracle && $(GO) vet ./... && $(GO) test -count=1 ./...) || \
	{ echo "witness-oracle: trustmesh's checkpoints, cosignatures or tlog-witness client disagree with torchwood or transparency-dev/formats (see above)"; exit 1; }

# Benchmarks, each quoted against a peer measured in the same run.
bench:
	bench/run.sh

# The soak (issue 14): trustmesh serve, 200 agents on 5-minute certificates,
# proxyless gRPC through policies rewritten every minute, an intermediate
# rotation every 2 minutes, for DURATION; prints the figures every minute and
# fails when a must-be-zero count is not zero or the control plane grows.
# As root it raises fs.inotify.max_user_instances for the run (restored).
DURATION ?= 30m
soak:
	DURATION="$(DURATION)" GO="$(GO)" hack/soak.sh

# Regenerate the Go code of trustmesh's own protos (needs protoc).
proto:
	hack/protoc.sh

# Fail if the committed protos' Go code or the chart's CRDs are stale:
# regenerates into a temporary directory, never into the tree.
generate-check:
	@hack/generate-check.sh
