# sfr: `make demo` renders a short clip with random weights; `make test` runs the whole test suite (what CI
# runs), `make test-fast` the edit loop's share of it: the unit tests and a handful of whole commands, under
# two minutes on 2 idle cores (no test marked `slow`, full-size models, or `heavy`, seconds each at tiny widths).
# `make install` includes the `ray` extra, so the tests run `sfr batch --ray local` for real.
# Every pip call is constrained by constraints.txt (torch==2.13.0), so pip never swaps in another torch
# version. Which build of it comes is the configured package index's choice (from PyPI on Linux: the CUDA
# build, several GB); a CPU-only machine can ask for the CPU wheel:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (`--index-url` for the torch install only; a fresh clone, or after `rm -rf .venv`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.sfr-installed
TORCH := torch==2.13.0
TORCH_INDEX ?=
TORCH_INDEX_ARGS := $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))
DEMO_OUT := demo-out

.PHONY: install test test-fast demo demo-enhance bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt $(TORCH_INDEX_ARGS) '$(TORCH)'
	$(PIP) install -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow and not heavy"

demo: install
	$(BIN)/sfr checkpoints random $(DEMO_OUT)/checkpoints --config tiny --layout pth --overwrite >/dev/null
	$(BIN)/sfr render --coeffs demo/coeffs.npy --source demo/source.png --audio demo/speech.wav \
		--checkpoint-dir $(DEMO_OUT)/checkpoints --config tiny -o $(DEMO_OUT)/demo.mp4 --overwrite >/dev/null
	@echo "Rendered with random weights (SadTalker's file layout, tiny widths), so the frames are abstract."
	@echo "For real faces, download SadTalker's checkpoints and run:"
	@echo "  $(BIN)/sfr render --coeffs demo/coeffs.npy --source demo/source.png --audio demo/speech.wav --checkpoint-dir path/to/SadTalker/checkpoints -o out.mp4"
	@echo "$(DEMO_OUT)/demo.mp4"

demo-enhance: install  # the same clip through the face enhancer (tiny widths: seconds), 512x512
	$(BIN)/sfr checkpoints random $(DEMO_OUT)/checkpoints-enhance --config tiny --enhancer --overwrite >/dev/null
	$(BIN)/sfr render --coeffs demo/coeffs.npy --source demo/source.png --audio demo/speech.wav \
		--checkpoint-dir $(DEMO_OUT)/checkpoints-enhance --config tiny --enhancer gfpgan-tiny \
		-o $(DEMO_OUT)/demo-enhanced.mp4 --overwrite >/dev/null
	$(BIN)/sfr render --coeffs demo/coeffs.npy --source demo/source.png --audio demo/speech.wav \
		--checkpoint-dir $(DEMO_OUT)/checkpoints-enhance --config tiny --enhancer restoreformer-tiny \
		--background-enhancer realesrgan-tiny -o $(DEMO_OUT)/demo-restoreformer-realesrgan.mp4 --overwrite >/dev/null
	@echo "$(DEMO_OUT)/demo-enhanced.mp4 and demo-restoreformer-realesrgan.mp4 (random weights at tiny widths; real faces need SadTalker's gfpgan/weights)"

bench: install
	$(BIN)/sfr bench --config tiny --frames 16

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build dist
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
