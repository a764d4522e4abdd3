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

# The main job on built-in data (sklearn's china.jpg and digits, no download), a few
# minutes on 2 cores; every PNG lands under $(DEMO_OUT).
DEMO_OUT ?= demo-out
demo: install
	rm -rf $(DEMO_OUT)
	$(PY) -m fastgen.cli doctor
	$(PY) -m fastgen.cli gpnn sample -n 4 --max-side 96 --out $(DEMO_OUT)/gpnn
	$(PY) -m fastgen.cli train vae --data digits --epochs 20 --out $(DEMO_OUT)/vae
	$(PY) -m fastgen.cli train vqvae --data digits --epochs 6 --out $(DEMO_OUT)/vqvae
	$(PY) -m fastgen.cli train pixelcnn --vqvae $(DEMO_OUT)/vqvae/checkpoint.pt --epochs 6 --out $(DEMO_OUT)/pixelcnn
	$(PY) -m fastgen.cli sample vqvae --checkpoint $(DEMO_OUT)/vqvae/checkpoint.pt --prior $(DEMO_OUT)/pixelcnn/checkpoint.pt --out $(DEMO_OUT)/vqvae-samples -n 64
	$(PY) -m fastgen.cli train imle --data digits --epochs 60 --eval-every 20 --out $(DEMO_OUT)/imle
	$(PY) -m fastgen.cli train imle --data digits --conditional top-half --epochs 60 --eval-every 20 --out $(DEMO_OUT)/imle-conditional
	$(PY) -m fastgen.cli sample imle --checkpoint $(DEMO_OUT)/imle-conditional/checkpoint.pt --out $(DEMO_OUT)/imle-completions -n 12
	$(PY) -m fastgen.cli bench --quick --repeats 3
	@echo "demo images: $(DEMO_OUT)/*/*.png"

# Every suite through the harness (long on 2 cores), then RESULTS.md sections and plots.
BENCH_JSON ?= benchmarks/last-run.json
bench: install
	$(PIP) --no-build-isolation -e ".[bench]"
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(BENCH_JSON) -p no:cacheprovider
	$(PY) benchmarks/report.py $(BENCH_JSON)

clean:
	rm -rf build build-asan *.egg-info fastgen/_C*.so $(DEMO_OUT)
