# Quick start: `make demo` (a local cluster) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
SK := $(VENV)/bin/shardkeeper
ZK_JAR := /usr/share/java/zookeeper.jar

.PHONY: demo demo-down test lint bench zookeeper clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "shardkeeper needs Python >= 3.11 (found $$($(PYTHON) --version))" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	@touch $@

zookeeper:
	@if [ -f $(ZK_JAR) ] && command -v java >/dev/null; then exit 0; fi; \
	echo "ZooKeeper not found: installing the Debian package zookeeper"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "cannot install ZooKeeper: run 'apt-get install -y zookeeper' as root" >&2; exit 1; fi; \
	command -v apt-get >/dev/null || { echo "no apt-get: install ZooKeeper 3.8 and Java 17, then set SHARDKEEPER_ZK_JAR to zookeeper.jar" >&2; exit 1; }; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq zookeeper >/dev/null

demo: $(VENV)/.installed zookeeper
	$(SK) dev up --agents 3 --coordinators 2 --shards 64 --replicas 2
	$(SK) load --keys 20000
	$(SK) status
	@echo
	@echo "== SIGKILL agent-3 and watch the cluster re-replicate what it held =="
	$(SK) dev kill agent-3 --watch
	@echo
	@echo "== verify: every shard's replicas hold the same data =="
	$(SK) verify
	$(SK) status
	@echo
	@echo "The cluster keeps running. Try: '$(SK) plan --drain agent-1' (what a drain would do),"
	@echo "'$(SK) drain agent-1 --wait', '$(SK) dev start agent-3', '$(SK) dev add-agent',"
	@echo "'$(SK) watch', '$(SK) dev status' (it prints the status page URL); stop it with"
	@echo "'make demo-down'."

demo-down: $(VENV)/.installed
	$(SK) dev down

test: $(VENV)/.installed zookeeper
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed zookeeper
	$(VENV)/bin/python -m bench.placement
	$(VENV)/bin/python -m bench.dataplane
	$(VENV)/bin/python -m bench.scale
	$(VENV)/bin/python -m bench.failover
	$(VENV)/bin/python -m bench.rolling

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
