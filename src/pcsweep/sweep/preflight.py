"""The stability pre-flight a sweep runs for each PC job before launching (inference's step size and
variance floor measured on the job's own data, as its run will)."""

from typing import TYPE_CHECKING, Any, Dict, cast

if TYPE_CHECKING:
    from pcsweep.model.twins import PCModule


class StabilityPreflight:
    """``pcsweep.run.task.measure_stability`` for a job's config, loading each dataset once per sweep."""

    def __init__(self) -> None:
        self.datasets: Dict[str, Any] = {}

    def __call__(self, settings: Any) -> dict:
        from pcsweep.run.task import build_model, measure_stability

        dataset = self.dataset(settings)
        model = build_model(settings, dataset.num_features, dataset.num_classes)
        return measure_stability(settings, cast("PCModule", model), dataset)  # called for PC jobs only

    def dataset(self, settings: Any) -> Any:
        """The job's dataset (as its run will load it: the validation split held out), loaded once per sweep."""
        from pcsweep.data.datasets import load_dataset

        key = repr(settings.dataset)
        if key not in self.datasets:
            self.datasets[key] = load_dataset(settings.dataset)
        return self.datasets[key]
