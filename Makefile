# `make package` and `make test` do all set-up on a fresh machine: they create .venv, install the project,
# its built-in plugins and test tools (pinned by constraints.txt), then build or test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE ?= examples/classifier
KEY ?= .deeplens/dev-signing-key.pem
PLUGINS := $(wildcard plugins/*/pyproject.toml)
STAMP := $(VENV)/.installed

.PHONY: package test bench clean

$(STAMP): pyproject.toml constraints.txt $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	# caffe2onnx pins onnx==1.6.0, which cannot build on Python 3.11; its real needs are already installed
	$(BIN)/python -m pip install --quiet --no-deps caffe2onnx==2.0.1
	touch $@

$(KEY): | $(STAMP)
	$(BIN)/deeplens-build keygen --out $(KEY)
	@echo "made a local development signing key: $(KEY) (use your own key or kms:KEY_ID for releases)"

package: $(STAMP) $(KEY)
	$(BIN)/deeplens-build package --config $(EXAMPLE)/deeplens.toml --signing-key $(KEY) --output dist

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py
	$(BIN)/python bench/bench_mxnet.py
	$(BIN)/python bench/bench_tensorflow.py
	$(BIN)/python bench/bench_pytorch.py
	$(BIN)/python bench/bench_caffe.py
	$(BIN)/python bench/bench_device.py
	$(BIN)/python bench/bench_io.py
	$(BIN)/python bench/bench_targets.py
	$(BIN)/python bench/bench_fp16.py
	$(BIN)/python bench/bench_int8.py

clean:
	rm -rf dist .deeplens $(EXAMPLE)/.deeplens
