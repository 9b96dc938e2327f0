# meshdns: `make run` serves the demo registry, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/meshdns.yaml

.PHONY: all venv install install-test run test test-unit lint bench bench-all bench-quick bench-tools clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Two tiers, each reinstalled whenever the package metadata changes: `make run` needs
# the runtime dependencies only; `make test` and `make lint` add the test extra.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/meshdns serve --config $(CONFIG)

# Every test, then the DNS tests again on the portable UDP path (one datagram per
# callback) that non-Linux systems and MESHDNS_UDP_BATCH=0 use instead of recvmmsg batches.
# Both tiers always run (a failure in the first does not hide the second); each one's
# result is printed at the end, and the target fails if either failed. Tests run in
# WORKERS pytest-xdist processes: most of a test's time is spent waiting on the servers
# it started (every one binds port 0 or picks again when a port was taken), so three
# workers fit two cores. WORKERS=0 runs them in this process, one at a time.
WORKERS ?= 3
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS))
TESTS ?=
UNBATCHED_TESTS ?= tests/system/test_smoke.py tests/system/test_dns_answers.py tests/system/test_dns_protocol.py \
	tests/system/test_forward.py tests/system/test_forward_hygiene.py tests/system/test_acl_rrl.py \
	tests/system/test_ede_nsid.py tests/system/test_ede_forward.py tests/system/test_views.py tests/system/test_dnstap.py \
	tests/system/test_node_netns.py
test: install-test
	@$(BIN)/python -m pytest -q $(XDIST) $(TESTS); all=$$?; \
	MESHDNS_UDP_BATCH=0 $(BIN)/python -m pytest -q $(XDIST) $(UNBATCHED_TESTS); unbatched=$$?; \
	echo "make test: every test: $$( [ $$all = 0 ] && echo passed || echo "FAILED (pytest exit $$all)" )"; \
	echo "make test: the unbatched UDP path (MESHDNS_UDP_BATCH=0): $$( [ $$unbatched = 0 ] && echo passed || echo "FAILED (pytest exit $$unbatched)" )"; \
	[ $$all = 0 ] && [ $$unbatched = 0 ]

# The unit tier alone (tests/unit/: no sockets, no child processes), in seconds.
test-unit: install-test
	$(BIN)/python -m pytest -q $(XDIST) tests/unit

# ruff, mypy --strict on the whole package, and the import-layer contract (pyproject.toml).
lint: install-test
	$(BIN)/ruff check meshdns tests bench
	$(BIN)/mypy meshdns
	$(BIN)/lint-imports

# Core micro benchmark: no external tools needed.
bench: install-test
	$(BIN)/python bench/bench_core.py

# Every part (micro, macro vs peers, scale, soak, forward, sync): needs `make bench-tools`.
bench-all: install-test
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py

bench-quick: install-test
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py --quick

# Peer servers and the load generator (root). The benches start their own instances
# on loopback high ports, so the system services are stopped. Go and miekg/dns build
# Kuma's DNS proxy (../shared/peers/kumadp) for bench/pod_traffic.py, which builds it.
bench-tools:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf unbound knot dnsmasq \
		golang-1.19-go golang-github-miekg-dns-dev
	-systemctl disable --now unbound knot dnsmasq >/dev/null 2>&1 || true

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
