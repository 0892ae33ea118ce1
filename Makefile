# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODELOPT_VENV := .venv-modelopt
MODELOPT_STAMP := $(MODELOPT_VENV)/.installed

.PHONY: demo test test-fast install ui clean stack-up stack-down example-dense modelopt

install: $(STAMP)

# pip takes torch/torchvision from the machine's wheel store when present; constraints.txt pins
# every transitive dependency to the set seen working together (see ../shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: the Prefect flow over params.yaml (temporary local Prefect
# server, MLflow in ./mlflow.db, DVC's local cache). A second run with nothing changed skips every stage.
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/vitq run

# The dense example (examples/digit_scenes, its own DVC project): scenes and training through DVC, then the
# pipeline; the stage commands call `python`, so the venv goes first on PATH.
example-dense: $(STAMP)
	cd examples/digit_scenes && PATH="$(CURDIR)/$(BIN):$$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false dvc repro train \
	  && PATH="$(CURDIR)/$(BIN):$$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false vitq run

# The tests compare with ModelOpt too (`vitq peers`, `vitq zoo`): its own venv, built once.
test: $(STAMP) $(MODELOPT_STAMP)
	$(BIN)/python -m pytest --durations=20

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

ui: $(STAMP)
	@echo "MLflow: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the runs tables, not the GenAI view)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The team stack on this machine without Docker (S3, MLflow server, Prefect server, a cpu worker),
# then the deployments; `source .stack/env` and `vitq orchestrate`. See docs/orchestration.md.
stack-up: $(STAMP)
	$(BIN)/python infra/local/stack.py up --state .stack --workers cpu
	. .stack/env && $(BIN)/vitq deploy --paused

stack-down:
	$(BIN)/python infra/local/stack.py down --state .stack

# NVIDIA ModelOpt's ONNX PTQ, the `modelopt` peer of `vitq peers`, in a venv of its own (.venv-modelopt): the pinned
# set in infra/modelopt-requirements.txt, each --no-deps; a .pth file adds the project venv's site-packages
# (torch, onnx, onnxruntime, numpy, ... and vitq) behind its own. setuptools is removed from it so the project's
# (>= 80, which ModelOpt asks for) is the one seen. See ../shared/ENVIRONMENT.md.
modelopt: $(MODELOPT_STAMP)

$(MODELOPT_STAMP): infra/modelopt-requirements.txt | $(STAMP)
	test -x $(MODELOPT_VENV)/bin/python || $(BIN)/python -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/python -m pip install -q --no-deps -r infra/modelopt-requirements.txt
	-$(MODELOPT_VENV)/bin/python -m pip uninstall -q -y setuptools
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(MODELOPT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vitq-project.pth"
	$(MODELOPT_VENV)/bin/python -c "import modelopt, onnx, onnxruntime; from modelopt.onnx.quantization import quantize; \
	  print('modelopt', modelopt.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
	touch $(MODELOPT_STAMP)

clean:
	rm -rf data models artifacts reports dvc.lock mlflow.db mlartifacts
