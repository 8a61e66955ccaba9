"""Selection without bias: no test-split value reaches a choice (pcsweep's own checks, callbacks, schedulers)."""

from pathlib import Path
from types import SimpleNamespace

from helpers import compose_settings
from pcsweep.run.task import _summary
from pcsweep.track.verdicts import run_checks


def test_whether_a_run_learned_is_judged_on_validation_where_there_is_a_split():
    """Validation at chance, test well above: the run failed to learn (the tuning stage and the claims exclude such
    runs, so the test split must not decide it); without a validation split the test split is all there is."""
    settings = compose_settings("algo=bp", "dataset.val_fraction=0.1")
    record = {"epoch": 0, "val_acc": 0.11, "test_acc": 0.9, "train_acc": 0.9}
    history = SimpleNamespace(records=[record], curve=[], train_seconds=1.0)
    summary = _summary(settings, Path("run"), history, "complete", num_classes=10)
    assert summary["status"] == "failed_to_learn"
    learned = run_checks(settings, summary, None, None)["learned"]
    assert learned["verdict"] == "failed to learn" and learned["judged_on"] == "validation"
    assert learned["final_acc"] == 0.11 and learned["final_test_acc"] == 0.9
    no_split = {"epoch": 0, "step": 10, "train_seconds": 1.0, "test_acc": 0.9, "train_acc": 0.9}
    plain = compose_settings("algo=bp")
    summary = _summary(
        plain, Path("run"), SimpleNamespace(records=[no_split], curve=[], train_seconds=1.0), "complete", 10
    )
    assert summary["status"] == "complete"
    assert run_checks(plain, summary, None, None)["learned"]["judged_on"] == "test (no validation split)"
