"""Runs of one pack trained side by side, each in its own thread with its own Lightning Trainer, callbacks, folder and
checkpoints, their training batches computed together: each member's ``train_batch`` waits until every member still
training has asked for one, and the last to ask runs them all as one batch of a ``PCEngine`` of R runs.

Everything else a run does (evaluations, probes, checkpoints, W&B) it does alone, as it would solo; a member that
ends (finished, diverged, failed) leaves the gang and the others go on without it; what one member's update raises
inside a packed batch fails that member alone. A member whose parameters were
moved by its own engine (the probes and curvature measurements run on it) is re-stacked before the next packed batch,
so the pack always trains the values the member holds.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from pcsweep.pc.engine import PCEngine
from pcsweep.pc.members import Member
from pcsweep.pc.schedule import BatchResult


class Gang:
    """The rendezvous of ``size`` members (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.active = set(range(size))
        self.engines: dict[int, PCEngine] = {}
        self.requests: dict[int, tuple] = {}
        self.results: dict[int, BatchResult | BaseException] = {}  # each member's batch, or what it raised
        self.population: Optional[PCEngine] = None
        self.population_of: tuple = ()
        self.condition = threading.Condition()

    def seat(self, index: int, engine: PCEngine) -> Seat:
        self.engines[index] = engine
        return Seat(self, index)

    def leave(self, index: int) -> None:
        """A member that stopped training: the others no longer wait for it."""
        with self.condition:
            self.active.discard(index)
            self.engines.pop(index, None)
            self._run_if_complete()
            self.condition.notify_all()

    def train_batch(self, index: int, request: tuple) -> BatchResult:
        """This member's batch, computed with the others'; what it raised (its own update, or the computation) is
        raised to it alone."""
        with self.condition:
            self.requests[index] = request
            self._run_if_complete()
            while index not in self.results:
                self.condition.wait()
            result = self.results.pop(index)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_if_complete(self) -> None:
        """Run the packed batch once every active member has asked (under the condition's lock)."""
        if not self.requests or set(self.requests) != self.active:
            return
        requests, self.requests = self.requests, {}
        try:
            self.results.update(self._compute(requests))
        except BaseException as exc:  # the computation itself failed: each member of this batch sees it
            self.population = None
            self.results.update({index: exc for index in requests})
        self.condition.notify_all()

    def _compute(self, requests: dict[int, tuple]) -> dict[int, BatchResult | BaseException]:
        members = sorted(requests)
        failures: dict[int, BaseException] = {}

        def guarded(index: int, update: Callable[[], None]) -> Callable[[], None]:
            """A member's own update (its optimizer, scheduler, hooks): what it raises fails that member alone."""

            def run() -> None:
                if index not in failures:
                    try:
                        update()
                    except BaseException as exc:
                        failures[index] = exc

            return run

        requests = {i: (r[0], r[1], guarded(i, r[2]), r[3]) for i, r in requests.items()}
        batch_sizes = {requests[i][0].shape[0] for i in members}
        traced = {requests[i][3] for i in members}
        if len(batch_sizes) > 1 or len(traced) > 1:  # not one shape this round (a resumed member): each alone
            self.population = None
            alone = {i: self.engines[i].train_batch(*requests[i]) for i in members}
            return {i: failures.get(i, alone[i]) for i in members}
        population = self._population(members)
        for member, i in zip(population.members, members):  # the step size and floor each engine holds now
            engine = self.engines[i]
            member.inference, member.log_variance_min = engine.inference, engine.log_variance_min
        population.parameters_changed()  # the floors as they stand (the automatic floor follows the curvature)
        inputs = torch.stack([requests[i][0] for i in members])
        target = torch.stack([requests[i][1] for i in members])
        results = population.train_batches(inputs, target, [requests[i][2] for i in members], requests[members[0]][3])
        return {i: failures.get(i, result) for i, result in zip(members, results)}

    def _population(self, members: list[int]) -> PCEngine:
        """The population of these members, re-stacked if the members changed or a member's parameters moved."""
        population = self.population
        if population is None or self.population_of != tuple(members) or not population.bound():
            engines = [self.engines[i] for i in members]
            population = PCEngine.of([Member(e.net, e.inference, e.log_variance_min) for e in engines])
            self.population, self.population_of = population, tuple(members)
        return population


class Seat:
    """One member's place in a gang: its ``train_batch`` (the engine's signature) and its leaving."""

    def __init__(self, gang: Gang, index: int) -> None:
        self.gang, self.index = gang, index

    def train_batch(
        self, inputs: Tensor, target: Tensor, apply_update: Callable[[], None], trace_energy: bool = False
    ) -> BatchResult:
        return self.gang.train_batch(self.index, (inputs, target, apply_update, trace_energy))

    def leave(self) -> None:
        self.gang.leave(self.index)
