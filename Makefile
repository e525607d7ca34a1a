# The README's two commands: `make course` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.capstone-installed
# No hub is reachable (or needed) for the cpu/smoke profiles.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TORCHDYNAMO_DISABLE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

.PHONY: setup course seeds test unit notebooks-smoke notebooks-cpu rehearsal bench clean

setup: $(STAMP)

# torch first, from its pinned CPU build; the constraint then holds it at that version.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	bash tools/install_speech_tools.sh
	touch $(STAMP)

course: setup
	CAPSTONE_PROFILE=cpu $(PY) -m capstone_lib.course --profile cpu

# The whole cpu course from three runtime seeds (not part of CI): runs/seeds/seeds.json.
seeds: setup
	$(PY) tools/seeds.py

# Unit tests (smoke-size, fast), then every notebook under nbmake on smoke and on cpu
# (the cpu run asserts the learning thresholds), then on both rehearsal profiles.
test: setup unit notebooks-smoke notebooks-cpu rehearsal

unit: setup
	$(PY) -m pytest -q tests

notebooks-smoke: setup
	CAPSTONE_PROFILE=smoke $(PY) -m pytest -q --nbmake notebooks

notebooks-cpu: setup
	CAPSTONE_PROFILE=cpu $(PY) -m pytest -q --nbmake notebooks

# The t4/a100 profiles' code path on CPU, offline: stand-ins at the real hub names (a local
# Hugging Face cache, and the Hub's download API emulated on 127.0.0.1 for downloads into a folder)
# and COCO 2017 served on 127.0.0.1 (tools/rehearsal.py), then every notebook under nbmake on
# t4-rehearsal and a100-rehearsal. Downloads go to $(REHEARSAL)/data, runs to runs/<profile>/.
REHEARSAL ?= $(CURDIR)/runs/rehearsal-standins
rehearsal: setup
	$(PY) tools/rehearsal.py prepare $(REHEARSAL)
	rm -f $(REHEARSAL)/port
	$(PY) tools/rehearsal.py serve $(REHEARSAL) --port-file $(REHEARSAL)/port & server=$$!; \
	trap "kill $$server" EXIT; \
	for i in $$(seq 100); do test -s $(REHEARSAL)/port && break; sleep 0.2; done; \
	eval "$$($(PY) tools/rehearsal.py env $(REHEARSAL) --endpoint $$(cat $(REHEARSAL)/port))"; \
	export CAPSTONE_DATA_DIR=$(REHEARSAL)/data; \
	for p in t4-rehearsal a100-rehearsal; do \
		CAPSTONE_PROFILE=$$p $(PY) -m pytest -q --nbmake notebooks || exit 1; \
	done

# Speed levers of the cpu course against fp32 (tools/bench_levers.py), then the stage benchmarks.
bench: setup
	env -u TORCHDYNAMO_DISABLE $(PY) tools/bench_levers.py
	$(PY) tools/bench_stages.py

clean:
	rm -rf runs data/generated
