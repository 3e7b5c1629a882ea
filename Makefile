# Every target is a thin call of the `uld` CLI (see `uld --help`).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ULD     := $(BIN)/uld
dataset ?= synthetic
backbone ?= shipped
FAISS_EXTRA ?= dev

.PHONY: setup test demo features ui ui-stop deploy clean-workspace help

help:
	@echo "make setup                      create .venv (torch CPU wheel first, then the project)"
	@echo "make demo                       synthetic data -> features -> ZeroShot -> D-ULD -> metrics"
	@echo "make test                       run the test suite"
	@echo "make features dataset=D [backbone=B]   cache diffusion hyperfeatures for dataset D"
	@echo "make ui [port=4200]             local Prefect server + UI on 127.0.0.1, reused by every uld command"
	@echo "make deploy                     serve features/zeroshot/train/demo as deployments, started from that UI"

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(FAISS_EXTRA)]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(ULD) demo

features: setup
	$(ULD) features --dataset $(dataset) --backbone $(backbone)

port ?= 4200
ui: setup
	$(ULD) ui --port $(port)

ui-stop: setup
	$(ULD) ui --stop

deploy: setup
	$(ULD) deploy

clean-workspace:
	rm -rf workspace
