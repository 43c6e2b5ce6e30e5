# The two README commands, `make demo` and `make test`, bootstrap everything:
# the virtual environment with the pinned packages, and the Debian RISC-V
# toolchain.  A second run finds both in place and starts at once.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
# the stamp's name carries a hash of pyproject.toml: editing the pins reinstalls
STAMP   := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
DEMO    := build/demo

.PHONY: setup toolchain demo test lint bench clean

setup: $(STAMP) toolchain

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# -qq: errors only; pip configs that name absent index folders warn once per package
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[dev,zoo]"
	@rm -f $(VENV)/.installed-* && touch $@

toolchain:
	@scripts/install-toolchain.sh

demo: setup
	$(BIN)/lowbit zoo export digits_cnn -o $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz
	$(BIN)/lowbit compile $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz -o $(DEMO)/digits_cnn_int8
	$(BIN)/lowbit inspect $(DEMO)/digits_cnn_int8 | sed -n '/^integer-only/p;/^quantized/p;/^kernels/p'
	$(BIN)/lowbit eval $(DEMO)/digits_cnn.onnx --data digits --calib $(DEMO)/digits_cnn.calib.npz
	$(BIN)/lowbit bench $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz --seconds 6 -q
	@# mixed precision: the per-layer plan at half the int8-to-int4 size range, then its accuracy
	$(BIN)/lowbit plan $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz --size-budget 0.5
	$(BIN)/lowbit eval $(DEMO)/digits_cnn.onnx --data digits --calib $(DEMO)/digits_cnn.calib.npz --bits mixed --size-budget 0.5
	$(BIN)/lowbit zoo export digits_vit -o $(DEMO)/digits_vit.onnx --calib $(DEMO)/digits_vit.calib.npz
	$(BIN)/lowbit compile $(DEMO)/digits_vit.onnx --calib $(DEMO)/digits_vit.calib.npz -o $(DEMO)/digits_vit_int8
	@# the verdict, and the kernels of one encoder block
	$(BIN)/lowbit inspect $(DEMO)/digits_vit_int8 | sed -n '/^integer-only/p;/^kernels/p;/repeated/,/^  [^ ]/p' | cut -c1-160
	$(BIN)/lowbit eval $(DEMO)/digits_vit.onnx --data digits --calib $(DEMO)/digits_vit.calib.npz

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/lowbit bench resnet18 --vs ort --json build/bench-resnet18.json

clean:
	rm -rf build .pytest_cache
