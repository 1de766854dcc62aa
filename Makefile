# routesync: every target is a thin wrapper over an npm script, so either works.
.PHONY: setup build run test test-node24 lint typecheck bench demo soak clean

setup:
	npm ci --no-audit --no-fund

build:
	npm run build

# One replica with the embedded defaults (no peers): local API 127.0.0.1:7788,
# peer API 0.0.0.0:7789, data plane 0.0.0.0:8080.
run: build
	node --max-semi-space-size=8 dist/main.js

# VITEST_ARGS passes extra options to vitest (for example a reporter, or a file filter).
test:
	npm test -- $(VITEST_ARGS)

# The same suite on Node 24, the container's runtime (deploy/Dockerfile), whatever node this
# machine has: npm's node-linux-<arch> package (the official binary, from the npm registry) is
# installed into .cache/node24 and put first on PATH, so vitest and its workers run on it.
NODE24 ?= 24
NODE24_DIR := $(CURDIR)/.cache/node24
NODE_ARCH = $(shell node -p process.arch)
test-node24:
	npm install --no-save --no-package-lock --no-audit --no-fund --prefix "$(NODE24_DIR)" "node-linux-$(NODE_ARCH)@$(NODE24)"
	PATH="$(NODE24_DIR)/node_modules/node-linux-$(NODE_ARCH)/bin:$$PATH" sh -c 'echo "tests on node $$(node --version)" && npm test -- $(VITEST_ARGS)'

lint:
	npm run lint

typecheck:
	npm run typecheck

# BENCH_ARGS passes options to bench/run.ts (for example --suite lifecycle --quick, or --rev HEAD).
bench: build
	npm run bench -- $(BENCH_ARGS)

# Three replicas as processes on 127.0.0.1-3 with fake sandboxes: routes applied on one replica
# arrive on the others, traffic flows through every data plane, a paused sandbox is refused,
# and SIGTERM stops everything with exit 0. DEMO_ARGS, for example `--ports 17788,17789,18080`.
demo:
	npm run demo -- $(DEMO_ARGS)

# Soak run, not part of `make test`: three replica processes and an upstream under steady
# changes and proxied traffic for minutes; samples heap, RSS, fds and outboxes and judges
# whether they level off (bench/results/soak.json), on the build as it ships. SOAK_ARGS, for
# example `--minutes 5`.
soak: build
	npm run soak -- $(SOAK_ARGS)

clean:
	rm -rf dist coverage .cache
