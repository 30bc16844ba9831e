"""tools/gpu_check.sh, the check run whenever a GPU machine is lent: its CPU-safe parts run here, so it cannot rot."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO


def gpu_check(tmp_path, only, **env):
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, GPU_CHECK_ONLY=only,
                                                          GPU_CHECK_LOGS=str(tmp_path / "logs"), **env))


@pytest.mark.slow
def test_the_gpu_check_lists_the_devices_and_benchmarks_into_one_table(tmp_path, mnist_dir):
    result = gpu_check(tmp_path, "devices bench_gan", MNIST_DIR=str(mnist_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout[result.stdout.index("GPU check (cpu)"):].splitlines()
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"devices", "bench_gan"}
    assert "passed" in rows["devices"] and "GPUs: 0 (the CPU only)" in rows["devices"]
    assert "passed" in rows["bench_gan"] and "Speedup of the chosen settings" in rows["bench_gan"]
    assert "plain fp32 step" in (tmp_path / "logs" / "bench_gan.log").read_text()


@pytest.mark.slow
def test_a_check_past_its_timeout_is_marked_and_fails_the_run(tmp_path):
    result = gpu_check(tmp_path, "devices", GPU_CHECK_TIMEOUT_SCALE="0.001")  # 60 s -> 1 s: TensorFlow loads slower.
    assert result.returncode == 1
    assert "[devices] timed out (1 s)" in result.stdout
    assert "[devices] timed out after 1 s: on a cold machine the first use of each kernel is compiled from PTX" \
        in result.stdout  # The reason, and what to do.
    assert any(line.startswith("devices") and "timed out (1 s)" in line for line in result.stdout.splitlines())


@pytest.mark.slow
def test_mirroring_slower_than_wanted_fails_the_check(tmp_path, mnist_dir):
    """Three logical CPU devices against one, held to a scaling no machine reaches: the check fails, saying why."""
    result = gpu_check(tmp_path, "mirrored_pays", MNIST_DIR=str(mnist_dir), GPU_CHECK_MIN_SCALING="100")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[mirrored_pays] failed (exit 1)" in result.stdout
    log = (tmp_path / "logs" / "mirrored_pays.log").read_text()
    assert "against one device" in log and "mirroring is slower than it should be" in log


def test_without_a_gpu_the_gpu_mode_stops_at_once_installing_nothing(tmp_path):
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has an NVIDIA driver: the case needs one without")
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=dict(os.environ, GPU_CHECK_LOGS=str(tmp_path / "logs")))
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["gpu_check: no NVIDIA GPU visible (nvidia-smi -L lists none; "
                                          "/proc/driver/nvidia/gpus/ is empty): nothing to check (--cpu runs the CPU "
                                          "checks)"]
    assert not (tmp_path / "logs" / "install.log").exists()


@pytest.mark.slow
def test_a_gpu_that_tensorflow_cannot_see_installs_from_a_wheel_folder_and_says_so(tmp_path):
    """A stand-in nvidia-smi; pip offline (PIP_NO_INDEX) with an empty folder of wheels: the install is
    tried from there only, fails, and the check stops in one line."""
    bin_dir, wheels = tmp_path / "bin", tmp_path / "wheels"
    bin_dir.mkdir()
    wheels.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=600,
                            cwd=REPO, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PIP_NO_INDEX="1",
                                               PIP_FIND_LINKS=str(wheels), GPU_CHECK_LOGS=str(tmp_path / "logs")))
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1].startswith('gpu_check: TensorFlow sees no GPU after installing '
                                                     'tensorflow[and-cuda]>=2.16,<3')
    install_log = (tmp_path / "logs" / "install.log").read_text()
    assert "nvidia" in install_log.lower() and "https://" not in install_log  # From the folder, not a registry.
