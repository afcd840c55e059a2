# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast`: the unit tests;
# `make demo-wan`: the demo with the embedded Wan-architecture model).
# All create .venv and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without nvidia-smi and without torch in .venv: this torch version, whichever build the package
# index serves for the platform (see docs/install.md: set PIP_INDEX_URL for the CPU-only wheel).
CPU_TORCH := torch==2.13.0

.PHONY: install test test-fast demo demo-wan serve docs bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

.make-install.stamp: $(BIN)/python pyproject.toml
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "no GPU found: installing $(CPU_TORCH) (the build your package index serves for this platform)"; \
		$(BIN)/pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install --quiet -e ".[test,ui]"
	@touch $@

install: .make-install.stamp

ENV := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Two pytest-xdist workers, a test file each at a time (module fixtures built once; the longest files
# first, in the order tests/conftest.py sets, so that both workers finish together), one BLAS/OpenMP
# thread per process: serially the suite kept one of the two cores idle most of the time. Tests that
# need two threads per rank set them (the conformance suite's two_threads_per_rank). Launchers running
# at once are safe: each holds its rendezvous port from the start (run/supervise.rendezvous_socket,
# tests/test_reliability.py starts two runs on one master_port).
PYTEST_PARALLEL := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(ENV) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST_PARALLEL) --durations=15 tests

# The unit tests only (one process, in-process calls; pytest -m unit), as make test runs them (one
# thread per process: two workers each spinning two threads on two cores ran some tests 50x slower).
test-fast: install
	$(PYTEST_PARALLEL) -m unit tests

# The demo video, its JSON sidecar, a contact sheet (PNG grid of frames) and the quality probe's report.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/video-infinity generate --config examples/cpu_demo.json --overwrite
	$(BIN)/video-infinity inspect outputs/cpu_demo.mp4 --ranks 2 --contact-sheet outputs/cpu_demo.png --overwrite

# The same with the embedded Wan-architecture model ("demo-wan"): 129 frames (33 latent frames) on 2 CPU
# processes; the probe takes the clip border in latent frames from the video's sidecar.
demo-wan: install
	HF_HUB_OFFLINE=1 $(BIN)/video-infinity generate --config examples/cpu_demo_wan.json --overwrite
	$(BIN)/video-infinity inspect outputs/cpu_demo_wan.mp4 --ranks 2 --contact-sheet outputs/cpu_demo_wan.png --overwrite

# The web UI on http://127.0.0.1:7860 (runs go to ./outputs).
serve: install
	HF_HUB_OFFLINE=1 $(BIN)/video-infinity serve

# The documentation site (mkdocs.yml, docs/) into site/: strict, so a broken link or a warning fails.
# docs/hooks.py generates the config reference from the package's pydantic models, hence the install.
docs: install
	@$(BIN)/python -c "import mkdocs, material" 2>/dev/null || $(BIN)/pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Every CPU result under benchmarks/results/ regenerated in sequence, about 29 minutes on 2 cores
# (benchmarks/bench_cpu.py --list: each run's arguments and estimate; GPU results and the long demo
# evaluations are run separately). Each result records its commit, machine, command line, environment
# and the files it measures: commit the code first, run this on a quiet machine, then commit the results.
bench-cpu: install
	@$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e ".[bench]"
	$(ENV) $(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) .make-install.stamp build dist site src/*.egg-info
