# The two commands a fresh machine needs (see README):
#   make demo   - installs everything, builds the extension, runs the main job on built-in data
#   make test   - installs everything, runs the C++ core under sanitizers and the whole pytest suite
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
# torch: an importable torch (CPU or CUDA build, >= 2.4) is kept as it is. Only when none
# is importable is $(TORCH_SPEC) installed -- from PyPI that is the default Linux build
# (CUDA libraries included, several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# chooses the CPU-only build instead.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Stamps are kept per Python environment (a hash of sys.prefix): a new venv starts with
# none, so everything it lacks is installed, whatever an earlier environment did here.
PY_ENV := $(shell $(PY) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
STAMPS = build/stamps/$(PY_ENV)
EXT_SO := fastgen/_C$(shell $(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)
# Where `import fastgen` leads from outside this folder: when it is not this checkout
# (another clone was installed since, or nothing is), the pip stamps below do not hold, and
# FORCE remakes them. (Not .PHONY: make searches no pattern rule for a phony target, so
# deps-% would never run.)
INSTALLED_AT := $(shell cd / && $(PY) -c "import importlib.util as u, os; s = u.find_spec('fastgen'); print(os.path.dirname(os.path.dirname(s.origin)) if s else '')" 2>/dev/null)
ifneq ($(INSTALLED_AT),$(CURDIR))
$(STAMPS)/deps-test $(STAMPS)/deps-bench: FORCE
endif
FORCE:
# The extension is rebuilt when the torch it was built against (build/ext-torch) is not the
# one this Python has (a venv with another torch); read from the package metadata, which
# is quick, not by importing torch.
EXT_TORCH := $(shell cat build/ext-torch 2>/dev/null)
TORCH_NOW := $(shell $(PY) -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null)
# (no torch yet: this run installs one, so an extension left by another environment is
# rebuilt against it)
ifneq ($(TORCH_NOW),$(EXT_TORCH))
$(EXT_SO): FORCE
endif

.PHONY: install install-bench test test-cpp test-py demo bench clean FORCE

# A second `make` reuses everything: pip runs only when pyproject.toml/setup.py changed
# (stamps under build/), and the extension is rebuilt by make's own timestamps, then by
# ninja in the persistent build/ folder, which recompiles only the sources that changed.
install: $(STAMPS)/deps-test $(EXT_SO)
install-bench: $(STAMPS)/deps-bench $(EXT_SO)

$(STAMPS)/torch:
	@mkdir -p $(STAMPS)
	@if $(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" 2>/dev/null; then \
		echo "fastgen: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif $(PY) -c "import torch" 2>/dev/null; then \
		echo "fastgen needs torch >= 2.4; the installed one is $$($(PY) -c 'import torch; print(torch.__version__)') (not replaced: upgrade it yourself)"; exit 1; \
	else \
		echo "fastgen: no torch found, installing $(TORCH_SPEC)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"; \
		$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	fi
	$(PIP) "setuptools>=77" wheel ninja
	@touch $@

# the package and an extra's dependencies; the extension is built apart (below).
# pytorch-fid is a test peer only (its Frechet distance); it requires torchvision, which
# would pull a torch of its own choosing, so it goes in without dependencies (the tests
# read its function without importing torchvision).
$(STAMPS)/deps-%: pyproject.toml setup.py Makefile | $(STAMPS)/torch
	FASTGEN_SKIP_EXT=1 $(PIP) --no-build-isolation -e ".[$*]"
	$(PIP) --no-deps "pytorch-fid==0.3.0"
	@touch $@

$(EXT_SO): $(CSRC) setup.py | $(STAMPS)/torch
	@echo "fastgen: building the C++ extension (ninja; only what changed since the last build)"
	$(PY) setup.py build_ext --inplace
	@$(PY) -c "import importlib.metadata as m; print(m.version('torch'))" > build/ext-torch
	@touch $@

test-cpp:
	cmake -S . -B build-asan -DFASTGEN_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build-asan -j 2
	ctest --test-dir build-asan --output-on-failure

test-py:
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=30
	# tests/test_cuda.py skips without a GPU; here it runs once more through the Triton
	# interpreter on CPU tensors so that the file itself is checked (not a GPU result)
	FASTGEN_TEST_CUDA_DEVICE=cpu $(PY) -m pytest tests/test_cuda.py -q -p no:cacheprovider

test: install test-cpp test-py

# The main job on built-in data (sklearn's china.jpg and digits, no download), a few
# minutes on 2 cores; every PNG lands under $(DEMO_OUT). The stages are listed in
# fastgen/demo.py, which prints the seconds each took.
DEMO_OUT ?= demo-out
demo: install-bench
	$(PY) -m fastgen.demo --out $(DEMO_OUT)

# Every suite through the harness (long on 2 cores), then RESULTS.md sections and plots.
BENCH_JSON ?= benchmarks/last-run.json
bench: install-bench
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(BENCH_JSON) -p no:cacheprovider
	$(PY) benchmarks/report.py $(BENCH_JSON)

clean:
	rm -rf build build-asan *.egg-info fastgen/_C*.so $(DEMO_OUT)
