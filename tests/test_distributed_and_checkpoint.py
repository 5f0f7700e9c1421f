"""Multi-device runs and checkpoint/resume, each in fresh Python processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import dbmtl_jax

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ)
    extra = dict(env_extra or {})
    if "XLA_FLAGS" in extra:  # add to the suite's flags (conftest.py), do not replace them
        extra["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra["XLA_FLAGS"]).strip()
    env.update(extra)
    proc = subprocess.run(
        [sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_data_parallel_and_fsdp_on_8_simulated_devices():
    out = _run(["multidevice_worker.py"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "multidevice OK" in out


# every method, in four groups so that pytest-xdist can spread them over workers (each group is two processes)
_GROUPS = 4


@pytest.mark.parametrize("group", range(_GROUPS))
def test_checkpoint_resume_is_bit_exact_for_every_method(tmp_path, group):
    names = sorted(dbmtl_jax.METHODS)[group::_GROUPS]
    assert names
    methods = ",".join(names)
    n = 6
    # The resuming process never saw the first half; it shares only the compiled executables
    # (persistent compilation cache), which keeps the test fast and cannot change results.
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    for mode in ("first+straight", "resume"):
        _run(["checkpoint_worker.py", methods, mode, str(tmp_path), str(n)], cache)
    for name in names:
        a = np.load(tmp_path / name / "straight.npz")
        b = np.load(tmp_path / name / "resumed.npz")
        assert len(a.files) == len(b.files) > 0
        for k in a.files:
            assert a[k].dtype == b[k].dtype, (name, k)
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: leaf {k} differs after resume")
