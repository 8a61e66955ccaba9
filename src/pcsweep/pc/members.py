"""The runs one ``PCEngine`` computes together (its members), what may share an engine, and what a pack costs.

A solo run is an engine of one member; a pack (seeds, learning-rate candidates, pc beside rc3, rc2 beside rc23) is an
engine of R members of one shape and schedule. Nothing here is math: that is ``pcsweep.pc.energy`` and the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pcsweep.config.errors import UserError
from pcsweep.pc.energy import Network
from pcsweep.pc.schedule import Inference

BYTES_HEADROOM = 0.8  # a pack may use this share of the free memory


class PackError(UserError, ValueError):
    """Members that cannot train as one computation, or a pack too large for the device (one line, before work)."""


@dataclass
class Member:
    """One run of an engine: its network (parameters by reference), inference settings and variance floor."""

    network: Network
    inference: Inference
    log_variance_min: float = -math.inf


def _shape(member: Member) -> tuple:
    net, inference = member.network, member.inference
    schedule = (
        inference.steps,
        inference.update_every,
        inference.check_every,
        inference.fixed_predictions,
        inference.solver,
    )
    return tuple(net.sizes), net.activation.name, net.output_loss, schedule


def _variance_shapes(member: Member) -> tuple:
    return tuple(None if s is None else tuple(s.shape) for s in member.network.log_variances)


def check_members(members: Sequence[Member]) -> None:
    """Members must share a shape (sizes, activation, output loss) and a schedule (T, update interval, check
    interval); their step sizes, momenta, tolerances, floors and learned variances may differ: a member with S = 1
    where another learns log S (pc beside rc3, rc2 beside rc23) holds a frozen log S = 0 there, which changes none
    of its numbers (exp(0) = 1 exactly). Two learned variances must have one shape (per neuron or per layer)."""
    if not members:
        raise PackError("a pack needs at least one member")
    first = _shape(members[0])
    for i, member in enumerate(members[1:], start=1):
        if _shape(member) != first:
            raise PackError(
                f"member {i} cannot pack with member 0: shape and schedule {_shape(member)} differ from {first} "
                "(sizes, activation, output loss; T, update interval, check interval, fixed predictions, solver)"
            )
    learned: dict[int, tuple] = {}
    for i, member in enumerate(members):
        for layer, shape in enumerate(_variance_shapes(member)):
            if shape is not None and learned.setdefault(layer, shape) != shape:
                raise PackError(
                    f"member {i} cannot pack with the others: its log-variance of layer {layer + 1} has shape "
                    f"{list(shape)}, another member's {list(learned[layer])} (per neuron and per layer do not mix)"
                )
    for i, member in enumerate(members):
        hidden = [s is None for s in member.network.log_variances[:-1]]
        if any(hidden) and not all(hidden):
            raise PackError(f"member {i}: hidden layers need a log-variance each, or none at all")
    if len(set(members[0].network.sizes[1:-1])) != 1:
        raise PackError(f"the hidden layers must share one width, got sizes {members[0].network.sizes}")


def pack_bytes(members: int, sizes: Sequence[int], batch: int, element_bytes: int, optimizer_states: int = 2) -> int:
    """What a pack holds: per member its parameters, gradients and ``optimizer_states`` optimizer tensors of each,
    and about twelve (H, B, width) activity buffers."""
    params = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    hidden = (len(sizes) - 2) * batch * sizes[1]
    return members * element_bytes * ((2 + optimizer_states) * params + 12 * hidden + 6 * batch * sizes[-1])


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` (the CPU's available memory from /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
    return info.get("MemAvailable", info.get("MemFree", 0))


def check_fits(members: int, sizes: Sequence[int], batch: int, dtype: torch.dtype, device: torch.device) -> int:
    """The pack's estimated bytes, or ``PackError`` (one line, before anything is allocated) if it will not fit."""
    need = pack_bytes(members, sizes, batch, torch.finfo(dtype).bits // 8)
    free = free_bytes(device)
    if need > BYTES_HEADROOM * free:
        raise PackError(
            f"a pack of {members} runs of sizes {list(sizes)} at batch {batch} needs about {need / 2**30:.2f} GiB, "
            f"and {device} has {free / 2**30:.2f} GiB free: pack fewer runs"
        )
    return need
