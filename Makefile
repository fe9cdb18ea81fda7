# `make demo` and `make test` set up .venv (once, or when pyproject.toml changes) and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
export BLENDTUNE_DATA_ROOT ?= $(abspath ../shared/data)
export WANDB_MODE ?= offline

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[video,plots,test]'  # every optional part: the tests use them
	touch $@

# FFmpeg, for video files: torchcodec loads its shared libraries and the video tests mux clips with its
# CLI. Installed when missing if we are root with apt-get (CI, containers); otherwise one line says what
# to run, and the video tests skip with that reason (with CI=true they fail instead).
HAVE_FFMPEG := command -v ffmpeg >/dev/null && { [ "$$(uname)" = Darwin ] || \
	PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p | grep -q 'libavcodec\.so\.'; }
INSTALL_FFMPEG := $(if $(filter Darwin,$(shell uname)),brew install ffmpeg,sudo apt-get install ffmpeg)

.PHONY: ffmpeg
ffmpeg:
	@if ! { $(HAVE_FFMPEG); }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "blendtune: installing FFmpeg for video decoding (apt-get install ffmpeg)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; } || \
	      echo "blendtune: could not install FFmpeg, video tests will skip; run: $(INSTALL_FFMPEG)"; \
	  else \
	    echo "blendtune: FFmpeg not found, video tests will skip; to install it run: $(INSTALL_FFMPEG)"; \
	  fi; \
	fi

.PHONY: demo test test-slow gpu-check
demo: $(VENV)/.installed
	$(VENV)/bin/blendtune compare experiments/synthetic_imbalanced_gblend.yaml --strategies naive,gblend,ogm_ge,unimodal:clean --seeds 5

test: $(VENV)/.installed ffmpeg
	$(VENV)/bin/python -m pytest -q -rs

test-slow: $(VENV)/.installed ffmpeg
	$(VENV)/bin/python -m pytest -q -rs -m slow

# The whole GPU check (about 8 minutes on one H100): tests on the device, step overhead, loader, sweep
# packing, Ray Train against no Ray, in one markdown file. `--device cpu` is its dry run (tests/test_gpu_check.py).
gpu-check: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/gpu_check.py --out gpu-check.md
