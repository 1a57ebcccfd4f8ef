# Tether. `make help` lists the targets.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
SERVERS  := ./relay/cmd/tether-relay ./controlplane/cmd/tether-controlplane ./controlplane/cmd/tetherctl
# The agent needs no HTTP/2 client (cross checks that cross.go, this file and
# the Dockerfile agree).
AGENT_TAGS := nethttpomithttp2

export CGO_ENABLED := 0
export GOTOOLCHAIN := local

.PHONY: help build run cluster test test-short tools cross packages bench fuzz clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

build: ## build tether-relay, tether-agent, tether-controlplane and tetherctl into ./bin
	@mkdir -p bin
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/ $(SERVERS)
	$(GO) build -trimpath -tags $(AGENT_TAGS) -ldflags "$(LDFLAGS)" -o bin/ ./agent/cmd/tether-agent

run: build ## start the demo: a standalone relay and an agent exposing a demo page; prints the URL
	$(GO) build -o bin/tether-demo ./relay/cmd/tether-demo
	./bin/tether-demo

cluster: ## start a cluster here: real NATS, a control plane, 3 relays on 127.0.0.1-3, an agent; prints the demo's URL on each relay
	$(GO) build -o bin/tether-cluster ./relay/cmd/tether-cluster
	./bin/tether-cluster

tools: ## install what the tests need (Debian): qemu-user-static for the ARM smoke test, shellcheck, busybox and curl for install.sh, minisign to check release signatures
	@if command -v qemu-arm-static >/dev/null && command -v qemu-aarch64-static >/dev/null && command -v shellcheck >/dev/null && command -v minisign >/dev/null && command -v busybox >/dev/null && command -v curl >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing qemu-user-static shellcheck minisign busybox curl"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static shellcheck minisign busybox curl >/dev/null; \
	else echo "make tools: install qemu-user-static, shellcheck, minisign, busybox and curl (as root) to run the ARM smoke test and check install.sh and release signatures"; fi

test: tools ## go vet, then every test with the race detector (what CI runs), the patched smux copy's own tests, and the agent's fuzzers for 5s each
	$(GO) vet ./...
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 15m ./...
	cd frames/wsmux/third_party/smux && CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 5m ./...
	$(GO) test -run '^$$' -fuzz FuzzEnrollAnswer -fuzztime 5s ./agent
	$(GO) test -run '^$$' -fuzz FuzzHostileSession -fuzztime 5s ./agent

test-short: ## the tests without the race detector, faster
	$(GO) test -count=1 ./...

cross: ## build every target into ./dist with SHA256SUMS; fails when a size budget is exceeded
	$(GO) run ./cross/cmd/xbuild -out dist -version $(VERSION)

packages: ## build the agent's .deb and .apk for every arch into ./dist/packages from make cross's binaries
	$(GO) run ./firmware/cmd/tether-packages -dist dist -out dist/packages -version $(VERSION)

bench: ## measure throughput, req/s, latency, CPU, memory, idle cost and a reconnect storm against direct; writes BENCHMARKS.md (BENCH_QUICK=1: ~2 min)
	$(GO) run ./cross/cmd/bench -out BENCHMARKS.md

fuzz: ## fuzz the frame decoder for a minute, the release manifest and boot-partition tether.env parsers and the agent against a hostile relay for 20s each
	$(GO) test -run '^$$' -fuzz FuzzRead -fuzztime 60s ./frames
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 20s ./firmware/release
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 20s ./agent/bootenv
	# the agent against a hostile relay: its enrollment answers, its session's frames
	$(GO) test -run '^$$' -fuzz FuzzEnrollAnswer -fuzztime 20s ./agent
	$(GO) test -run '^$$' -fuzz FuzzHostileSession -fuzztime 20s ./agent

clean: ## remove build output (keeps ./tether-data)
	rm -rf bin dist
