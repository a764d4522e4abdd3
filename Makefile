# The two commands a fresh machine needs (see README):
#   make demo   - installs everything, builds the extension, runs the main job on built-in data
#   make test   - installs everything, runs the C++ core under sanitizers and the whole pytest suite
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
# torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
TORCH_PIN = torch==2.13.0

.PHONY: install test test-cpp test-py demo bench clean

install:
	$(PIP) $(TORCH_PIN)
	$(PIP) "setuptools>=64" wheel
	$(PIP) --no-build-isolation -e ".[test]"

test-cpp:
	cmake -S . -B build-asan -DFASTGEN_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build-asan -j 2
	ctest --test-dir build-asan --output-on-failure

test-py:
	$(PY) -m pytest tests -q -p no:cacheprovider

test: install test-cpp test-py

demo: install
	$(PY) -m fastgen.cli doctor
	$(PY) -m fastgen.cli bench --quick

bench: install
	$(PIP) -e ".[bench]" --no-build-isolation
	$(PY) benchmarks/report.py

clean:
	rm -rf build build-asan *.egg-info fastgen/_C*.so
