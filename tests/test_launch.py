"""Launching without SLURM: local GPU slots and the gpus launcher's CPU fallback."""

import threading
import time

from helpers import CONF_DIR, SMALL, pcsweep
from pcsweep.run.devices import gpu_slot


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


def test_paper_preset_adds_the_decayed_rc23_to_every_dataset_width_and_seed():

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.pcsweep_sweeper import PcsweepSweeper
    from pcsweep.config.compose import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=paper"], return_hydra_config=True)
    sweeper_cfg = cfg.hydra.sweeper
    sweeper = PcsweepSweeper.__new__(PcsweepSweeper)  # no setup: only the grid's expansion
    sweeper.also = [dict(entry) for entry in sweeper_cfg.also]
    grid = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper_cfg.params.items()] + ["width=256"])
    (jobs,) = sweeper.split_arguments(grid, None)
    decayed = [job for job in jobs if "weight_decay=1e-06" in job]
    assert len(jobs) == 2 * 4 * 2 * 3 + 2 * 3  # algo x relax x dataset x seed (the command line's width=256), + rc23
    assert len(decayed) == 2 * 3 and all("relax=23" in job and "algo=pc" in job for job in decayed)
    assert all("variance_weight_decay=1e-06" in job for job in decayed)
    assert sorted({o for job in decayed for o in job if o.startswith(("dataset=", "seed="))}) == [
        "dataset=fashion_mnist",
        "dataset=mnist",
        "seed=0",
        "seed=1",
        "seed=2",
    ]
