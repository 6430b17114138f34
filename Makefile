# muonlab — `make help` lists the targets. Every target installs what is missing first.
PY := $(shell scripts/python.sh)
ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: ## install muonlab and what is missing (CPU torch 2.13.0 where there is no CUDA)
	@scripts/install.sh

install-dev: ## install + the test tools
	@scripts/install.sh dev

train: install ## the default run: small GPT-2 on Shakespeare with Muon (4–7 min on 2 CPU cores); ARGS="optim=adamw ..."
	$(PY) train.py $(ARGS)

test: install-dev ## the test suite (~16 min on 2 CPU cores), without the slow end-to-end runs
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install-dev ## the slow end-to-end tests (~32 min: the default run, resume, DDP/FSDP parity, a real SLURM cluster, lm-eval)
	@scripts/install.sh dev,eval
	@scripts/install_slurm.sh
	$(PY) -m pytest -m slow $(ARGS)

count-params: install ## parameter counts of every named model size
	@for m in gpt2_125m gpt2_350m gpt2_774m gpt2_1.5b llama_60m llama_130m llama_350m llama_1b llama_marin_130m llama_marin_300m llama_marin_520m llama_marin_1.2b llama_suite_a_210m llama_suite_a_720m; do $(PY) scripts/count_params.py model=$$m; done

clean-runs: ## delete runs/ and multiruns/
	rm -rf runs multiruns

clean: ## delete caches (tokenized data, pytest) — not runs
	rm -rf .cache .pytest_cache

.PHONY: help install install-dev train test test-slow count-params clean-runs clean
