"""Launching without SLURM: local GPU slots and the gpus launcher's CPU fallback."""

import threading
import time

from helpers import SMALL, pcsweep
from pcsweep.devices import gpu_slot


def test_gpu_slots_are_exclusive_and_released(tmp_path):
    with gpu_slot(tmp_path, 2) as first, gpu_slot(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
        claimed = []
        waiter = threading.Thread(target=lambda: claimed.append(gpu_slot(tmp_path, 2, poll_seconds=0.05).__enter__()))
        waiter.start()
        time.sleep(0.3)
        assert claimed == []  # both GPUs are busy: the third job waits
    waiter.join(timeout=5)
    assert claimed and claimed[0] in (0, 1)  # ... and gets one as soon as a job ends


def test_gpus_launcher_without_a_gpu_trains_on_the_cpu_with_a_warning(tmp_path):
    result = pcsweep(tmp_path, "-m", *SMALL, "launcher=gpus", "algo=bp,pc", "relax=none")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("launcher=gpus but no GPU is visible here: training on the CPU") == 2
    assert "bp_24_3" in result.stdout and "pc_24_3" in result.stdout and "complete" in result.stdout
