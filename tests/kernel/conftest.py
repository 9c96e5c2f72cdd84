import os
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
