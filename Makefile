# The two README commands, `make demo` and `make test`, bootstrap everything:
# the virtual environment with the pinned packages, and the Debian RISC-V
# toolchain.  A second run finds both in place and starts at once.

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
BIN     := $(VENV)/bin
# the stamp's name carries a hash of pyproject.toml: editing the pins reinstalls
STAMP   := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
DEMO    := build/demo

.PHONY: setup toolchain demo test lint conformance fuzz bench bench-gpu rv32-profile clean

setup: $(STAMP) toolchain

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# -qq: errors only; pip configs that name absent index folders warn once per package
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[dev,zoo,bench,tosa]"
	@rm -f $(VENV)/.installed-* && touch $@

toolchain:
	@scripts/install-toolchain.sh

demo: setup
	$(BIN)/lowbit zoo export digits_cnn -o $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz
	$(BIN)/lowbit compile $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz -o $(DEMO)/digits_cnn_int8
	$(BIN)/lowbit inspect $(DEMO)/digits_cnn_int8 | sed -n '/^integer-only/p;/^quantized/p;/^kernels/p'
	@# the same model for a RISC-V microcontroller: a C project with a static memory plan, run under QEMU
	$(BIN)/lowbit compile $(DEMO)/digits_cnn.onnx --calib $(DEMO)/digits_cnn.calib.npz --target rv32 -o $(DEMO)/digits_cnn_rv32
	$(BIN)/lowbit profile $(DEMO)/digits_cnn_rv32 | tail -2
	@# accuracy: ORT FP32 and INT8, lowbit on this CPU, and lowbit's rv32 build under QEMU
	$(BIN)/lowbit eval $(DEMO)/digits_cnn.onnx --data digits --calib $(DEMO)/digits_cnn.calib.npz --also rv32
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

# one worker per core, each taking whole test files (a module's fixtures are built once)
test: lint
	$(BIN)/python -m pytest -q -n logical --dist loadfile

# ONNX's backend node tests (onnx 1.23, generated in memory) through lowbit's onnx.backend Backend:
# pass / fail / unsupported per op beside ONNX Runtime's passes (compiler/tools/conformance.py); fails when a
# case of tests/conformance/passing.txt regresses
conformance: setup
	@mkdir -p bench/results
	$(BIN)/python -m compiler.tools.conformance --json bench/results/conformance.json > bench/results/conformance.md; \
		status=$$?; cat bench/results/conformance.md; exit $$status

# differential fuzzing past CI's fixed seed and budget: random seeds, FUZZ_EXAMPLES per property (rv32:
# a tenth); a failure is shrunk and saved to tests/regressions/, which `make test` replays from then on
FUZZ_EXAMPLES ?= 1000

fuzz: setup
	LOWBIT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py

# Real exports from the corpus (models/corpus.py: batch 1 from the static dynamo export, batch 8 from the
# dynamic-batch one where the corpus has it), then the MLPerf Tiny models and the digits models at batch 1
# and 8; 1 and 2 threads each.  lowbit INT8 and FP32 against ORT FP32/INT8 and OpenVINO FP32/INT8 (NNCF),
# interleaved (compiler/tools/bench.py); JSON per model, then the README's table.  BENCH_IREE's batch-1
# runs also time IREE on lowbit's own integer program (--target tosa: an iree-int8 row)
BENCH_CORPUS  := resnet18 resnet50 mobilenet_v2 mobilenet_v3_large efficientnet_b0 deit_tiny bert_base
BENCH_IREE    := resnet18 deit_tiny
BENCH_BATCH8  := resnet18 mobilenet_v2 deit_tiny bert_base
BENCH_ZOO     := digits_cnn digits_vit ds_cnn resnet8 mobilenet_v1_025 fc_autoencoder
BENCH_JSON    := $(addsuffix .json,$(BENCH_CORPUS) $(addsuffix .batch8,$(BENCH_BATCH8)) $(BENCH_ZOO))

bench: setup
	@mkdir -p bench/results
	for m in $(BENCH_CORPUS); do \
		case " $(BENCH_IREE) " in *" $$m "*) peer="--target tosa";; *) peer="";; esac; \
		$(BIN)/lowbit bench $$m.dynamo $$peer --threads 1,2 --seconds 8 -q --json bench/results/$$m.json || exit 1; \
	done
	for m in $(BENCH_BATCH8); do \
		$(BIN)/lowbit bench $$m.dynamo.dynbatch --batch 8 --threads 1,2 --seconds 8 -q \
			--json bench/results/$$m.batch8.json || exit 1; \
	done
	for m in $(BENCH_ZOO); do \
		$(BIN)/lowbit bench $$m --batch 1,8 --threads 1,2 --seconds 8 -q --json bench/results/$$m.json || exit 1; \
	done
	$(BIN)/python -m compiler.tools.bench $(addprefix bench/results/,$(BENCH_JSON)) | tee bench/results/table.md

# on a CUDA GPU (the device tool's machines): lowbit INT8 against lowbit FP32, TVM FP16 and ORT CUDA for
# DeiT-tiny and ResNet-18 at batch 1 and 8, interleaved (compiler/tools/bench_gpu.py); exits 2, measuring
# nothing, where there is no GPU
GPU_BENCH_MODELS := deit_tiny resnet18

bench-gpu: setup
	$(BIN)/python -m compiler.tools.bench_gpu $(GPU_BENCH_MODELS) --batch 1,8 --out bench/results/gpu

# every zoo model for rv32imc: instructions per MAC (QEMU, -icount shift=0: exact), the static plan's
# arena against its lower bound and against no reuse, stack, flash and code; JSON per model, then the
# README's table
RV32_MODELS := digits_cnn digits_vit ds_cnn resnet8 mobilenet_v1_025 fc_autoencoder

rv32-profile: setup
	@mkdir -p bench/results/rv32 build/rv32
	for m in $(RV32_MODELS); do \
		$(BIN)/lowbit zoo export $$m -o build/rv32/$$m.onnx --calib build/rv32/$$m.npz -q && \
		$(BIN)/lowbit compile build/rv32/$$m.onnx --calib build/rv32/$$m.npz --target rv32 -o build/rv32/$$m -q && \
		$(BIN)/lowbit profile build/rv32/$$m --json bench/results/rv32/$$m.json > /dev/null || exit 1; \
	done
	$(BIN)/python -m codegen.rv32.qemu $(foreach m,$(RV32_MODELS),$(m)=bench/results/rv32/$(m).json) \
		| tee bench/results/rv32/table.md

clean:
	rm -rf build .pytest_cache
