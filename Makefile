# ksift: `make run` and `make test` are the whole quick start (README).
# Both install what the project needs, system packages included (as root),
# into a .venv inside this checkout.

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
CLANG       ?= clang-14
BPF_SRC     := $(wildcard bpf/*.bpf.c)
BPF_HDRS    := $(wildcard bpf/*.h)
BPF_OUT     := src/ksift/bpf_objects
BPF_OBJS    := $(patsubst bpf/%.bpf.c,$(BPF_OUT)/%.bpf.o,$(BPF_SRC))
# -mcpu=v3: atomics with fetch/cmpxchg; -g: BTF for CO-RE and for the ABI test.
BPF_CFLAGS  := -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -Wall -Werror -Ibpf
# Debian packages the build and the tests need (pinned by Debian 12's archive).
APT_PKGS    := clang-14 libbpf-dev libbpf1 bpftool make gcc python3-venv
# Building and running the container image (podman with runc: crun refuses hybrid cgroup hosts; a
# Debian 12 base made with mmdebstrap where no registry is reachable).
IMAGE_APT_PKGS := podman runc mmdebstrap
# What only the tests need: the real receivers, a headless browser they drive, the image's tools.
TEST_APT_PKGS := prometheus prometheus-alertmanager chromium chromium-driver $(IMAGE_APT_PKGS)
# What only `make bench` needs: the reference it compares the agent with.
BENCH_APT_PKGS := bpftrace
BENCH_OUT   := build/bench
DIST        := dist
STAMP_SYS   := $(VENV)/.system-deps
STAMP_PY    := $(VENV)/.python-deps
STAMP_TEST  := $(VENV)/.test-system-deps
STAMP_BENCH := $(VENV)/.bench-system-deps
STAMP_IMAGE := $(VENV)/.image-system-deps
IMAGE       ?= ksift:0.1.0
ARGS        ?=

.PHONY: run test build objects dist image image-offline deps system-deps vmlinux bench bench-sensors clean

run: build
	$(VENV)/bin/ksift run $(ARGS)

test: build $(STAMP_TEST)
	$(VPY) -m ruff check src tests bench
	$(VPY) -m pytest $(ARGS)

build: deps $(BPF_OBJS)

# Only the BPF objects (clang-14 and libbpf-dev's headers), e.g. in an unpacked sdist.
objects: $(BPF_OBJS)

# A wheel (with the compiled BPF objects, tagged py3-none-manylinux_2_17_x86_64 by setup.cfg) and an
# sdist (the C sources and the objects) in dist/: docs/deploy.md, "The wheel". python -m build makes the
# wheel from the sdist, so a wheel that lacks an object means the sdist lacks it too: check.
dist: build
	rm -rf $(DIST)
	$(VPY) -m build --outdir $(DIST) .
	@for o in $(notdir $(BPF_OBJS)); do \
		$(VPY) -m zipfile -l $(DIST)/ksift-*.whl | grep -q "ksift/bpf_objects/$$o" \
			|| { echo "the wheel lacks bpf_objects/$$o" >&2; exit 1; }; \
	done
	@ls -l $(DIST)

# The container image from the wheel (deploy/container/Containerfile; docs/deploy.md, "Container image"):
# `image` pulls debian:12-slim from a registry, `image-offline` makes that base with mmdebstrap from
# Debian's archive first. Behind a TLS-intercepting proxy add PODMAN_OPTS="--secret id=ca,src=CA-BUNDLE".
image: dist $(STAMP_IMAGE)
	podman --runtime runc build --network host $(PODMAN_OPTS) -f deploy/container/Containerfile -t $(IMAGE) $(DIST)

image-offline: dist $(STAMP_IMAGE)
	PODMAN="podman --runtime runc" BUILD_OPTS="$(PODMAN_OPTS)" deploy/container/build-offline.sh $(DIST)/ksift-*.whl $(IMAGE)

$(STAMP_IMAGE): $(STAMP_SYS)
	$(call apt_install,$(IMAGE_APT_PKGS))
	@touch $@

deps: $(STAMP_PY)

system-deps: $(STAMP_SYS)

# Install the Debian packages named in $(1) that are missing (root only).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

$(STAMP_SYS):
	$(call apt_install,$(APT_PKGS))
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@touch $@

# Makefile too: a package added to a list above is installed on the next run.
$(STAMP_TEST): $(STAMP_SYS) Makefile
	$(call apt_install,$(TEST_APT_PKGS))
	@touch $@

$(STAMP_PY): $(STAMP_SYS) pyproject.toml Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]' 'build>=1.2,<2' 'kubernetes-validate>=1.30,<2' 'PyYAML>=6,<7'
	@touch $@

$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c $(BPF_HDRS) | $(STAMP_SYS)
	@mkdir -p $(BPF_OUT)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# Regenerate the committed vmlinux.h from the running kernel's BTF.
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/vmlinux.h

# Overhead (with bpftrace side by side), footprint, detection latency and a ring-buffer flood (bench/run_bench.py).
bench: build $(STAMP_BENCH) $(BENCH_OUT)/flood.bpf.o
	$(VPY) bench/run_bench.py $(ARGS)

$(STAMP_BENCH): $(STAMP_SYS)
	$(call apt_install,$(BENCH_APT_PKGS))
	@touch $@

# The flood's load generator: same flags as every ksift object, never loaded by the agent.
$(BENCH_OUT)/flood.bpf.o: bench/flood.bpf.c $(BPF_HDRS) | $(STAMP_SYS)
	@mkdir -p $(BENCH_OUT)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# Each sensor alone on the operation it hooks, with and without ksift (bench/sensor_bench.py).
bench-sensors: build
	$(VPY) bench/sensor_bench.py $(ARGS)

clean:
	rm -rf $(BPF_OUT) build $(DIST) *.egg-info src/*.egg-info
