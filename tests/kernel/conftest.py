import os
import time
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    # Loading BPF needs root (CAP_BPF + CAP_PERFMON) and a kernel with BTF; say which is missing.
    here = Path(__file__).parent
    reason = None
    if os.geteuid() != 0:
        reason = "kernel tests need root (CAP_BPF, CAP_PERFMON) to load BPF programs"
    elif not Path("/sys/kernel/btf/vmlinux").exists():
        reason = "this kernel has no BTF (/sys/kernel/btf/vmlinux): CO-RE programs cannot load"
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.kernel)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """The wheel and sdist of this checkout, built once per session (tests/kernel/shipping.py)."""
    from shipping import build_dist

    return build_dist(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def ksift_image(dist, tmp_path_factory) -> str:
    """The container image of this wheel (deploy/container/), built the offline way once per wheel
    content and kept in podman's storage; skipped, saying why, where podman cannot run."""
    from shipping import CACHE, build_image, podman_missing

    missing = podman_missing()
    if missing:
        pytest.skip(f"cannot build or run the image: {missing}")
    tag, took = build_image(dist, tmp_path_factory.mktemp("image") / "build.log")
    if took:
        with open(CACHE / "image-build-times.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {tag} {took:.1f}s\n")
    return tag
