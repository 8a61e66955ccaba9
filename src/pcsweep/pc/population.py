"""R runs of one shape as one computation: the math of ``pcsweep.pc.energy`` with a run dimension on every tensor,
so that one kernel serves R runs (seeds, learning-rate candidates, pc beside rc3, rc2 beside rc23).

Layout: hidden tensors are (H, R, B, n), layers outermost, so that the rows of any set of layers, for all runs, are
one contiguous block (one batched product for all predictions of all runs). Each member keeps its own parameters (views
of the population's stacks, so its own optimizer updates them in place), its own step size, momentum, tolerance and
variance floor, and its own schedule of updates: a member whose inference converged is frozen (step 0, velocity 0)
while the others go on. A member's numbers equal its solo run's (``PCEngine`` + ``schedule.train_batch``) to float
rounding: ``tests/test_population.py`` holds every twin to 1e-10 in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from pcsweep.errors import UserError
from pcsweep.pc.energy import Network, output_loss
from pcsweep.pc.engine import NARROW_MAX_WIDTH
from pcsweep.pc.schedule import BatchResult, Inference, plateaued

BYTES_HEADROOM = 0.8  # a pack may use this share of the free memory


class PackError(UserError, ValueError):
    """Members that cannot train as one computation, or a pack too large for the device (one line, before work)."""


@dataclass
class Member:
    """One run of a population: its network (parameters by reference), inference settings and variance floor."""

    network: Network
    inference: Inference
    log_variance_min: float = -math.inf


def _shape(member: Member) -> tuple:
    net, inference = member.network, member.inference
    schedule = (inference.steps, inference.update_every, inference.check_every, inference.fixed_predictions)
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
                "(sizes, activation, output loss; T, update interval, check interval)"
            )
    learned: dict[int, tuple] = {}
    for i, member in enumerate(members):
        for layer, shape in enumerate(_variance_shapes(member)):
            if shape is not None and learned.setdefault(layer, shape) != shape:
                raise PackError(
                    f"member {i} cannot pack with the others: its log-variance of layer {layer + 1} has shape "
                    f"{list(shape)}, another member's {list(learned[layer])} (per neuron and per layer do not mix)"
                )
    if members[0].inference.fixed_predictions:
        raise PackError("fixed predictions are not supported in a pack")
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


class Population:
    """Inference and learning for R members of one shape at once (see the module docstring)."""

    def __init__(self, members: Sequence[Member]) -> None:
        check_members(members)
        self.members = list(members)
        net = members[0].network
        self.R, self.L = len(members), net.num_layers
        self.H, self.sizes = self.L - 1, net.sizes
        self.activation, self.output_loss = net.activation, net.output_loss
        like = net.weights[0]
        self.dtype, self.device = like.dtype, like.device
        self._stack_parameters()
        self._buffers_for: Optional[int] = None
        # plain descent for every member: activities move directly (no velocity buffer to scale and add)
        self.heavy_ball = any(m.inference.momentum for m in members)
        # CPU, narrow layers: predict from a contiguous copy of W^T (x @ W^T reads W against its layout; as
        # PCEngine's transposed copy, measured by pcsweep.bench)
        narrow = self.device.type == "cpu" and self.sizes[1] <= NARROW_MAX_WIDTH
        self.w_hid_t: Optional[Tensor] = None
        if narrow and self.w_hid is not None:
            self.w_hid_t = torch.empty_like(self.w_hid)
        self.parameters_changed()

    # ----------------------------------------------------------------- parameters
    def _stack(self, pick: Callable[[Network], Sequence[Optional[Tensor]]], layer_major: bool) -> tuple[Tensor, Tensor]:
        """One tensor holding ``pick(network)`` of every member (layers outermost when ``layer_major``), every
        member's parameters bound to views of it; and its gradient stack, bound to their ``.grad``. A member with
        None there (no learned variance) holds zeros, bound to nothing: a frozen log S = 0."""
        per_member = [list(pick(m.network)) for m in self.members]
        layers = len(per_member[0])
        like = [next(t for t in (p[i] for p in per_member) if t is not None) for i in range(layers)]

        def value(p: Optional[Tensor], i: int) -> Tensor:
            return torch.zeros_like(like[i]) if p is None else p.detach()

        if layer_major:
            stack = torch.stack([torch.stack([value(p[i], i) for p in per_member]) for i in range(layers)])
            views = [[stack[i, r] for i in range(layers)] for r in range(self.R)]
        else:  # one parameter per member: (R, ...)
            stack = torch.stack([value(p[0], 0) for p in per_member])
            views = [[stack[r]] for r in range(self.R)]
        grads = torch.zeros_like(stack)
        for r, params in enumerate(per_member):
            for i, p in enumerate(params):
                if p is None:
                    continue
                p.data = views[r][i]
                p.grad = grads[i, r] if layer_major else grads[r]
                self._bindings.append((p, p.data, p.grad))
        return stack, grads

    def bound(self) -> bool:
        """Every member's parameters (and gradients) are still views of this population's stacks: nothing (a
        member's own engine, a checkpoint load into a new tensor) has moved them since."""
        return all(
            p.data_ptr() == view.data_ptr() and p.grad is not None and p.grad.data_ptr() == grad.data_ptr()
            for p, view, grad in self._bindings
        )

    def _stack_parameters(self) -> None:
        self._bindings: list[tuple[Tensor, Tensor, Tensor]] = []
        L, H = self.L, self.H
        self.w_in, self.gw_in = self._stack(lambda n: n.weights[:1], False)  # (R, n, n_in)
        self.b_in, self.gb_in = self._stack(lambda n: n.biases[:1], False)  # (R, n)
        self.w_out, self.gw_out = self._stack(lambda n: n.weights[L - 1 :], False)  # (R, n_out, n)
        self.b_out, self.gb_out = self._stack(lambda n: n.biases[L - 1 :], False)  # (R, n_out)
        self.w_hid: Optional[Tensor] = None  # (H-1, R, n, n)
        if L > 2:
            self.w_hid, self.gw_hid = self._stack(lambda n: n.weights[1 : L - 1], True)
            self.b_hid, self.gb_hid = self._stack(lambda n: n.biases[1 : L - 1], True)  # (H-1, R, n)
        # log-variances where any member learns them (a member learning none holds a frozen 0: see check_members)
        learns = [[s is not None for s in m.network.log_variances] for m in self.members]
        self.learns_variance = [any(row) for row in learns]
        self.s_hid: Optional[Tensor] = None  # (H, R, n or 1): hidden log-variances
        self.s_out: Optional[Tensor] = None  # (R, n_out or 1)
        if any(row[0] for row in learns):
            self.s_hid, self.gs_hid = self._stack(lambda n: n.log_variances[:H], True)
        if any(row[L - 1] for row in learns):
            self.s_out, self.gs_out = self._stack(lambda n: n.log_variances[L - 1 :], False)

    def parameters_changed(self) -> None:
        """Re-derive what depends on the parameters alone (floors applied); call after any optimizer step."""
        self._input_current = False  # a_1 = W_1 x_0 + b_1 changes only with W_1, b_1 (x_0 is clamped)
        with torch.no_grad():
            if self.w_hid_t is not None:
                assert self.w_hid is not None
                self.w_hid_t.copy_(self.w_hid.transpose(2, 3))
            floors = torch.tensor(  # no floor on a frozen log S = 0 (a member that learns none)
                [m.log_variance_min if learns else -math.inf for m, learns in zip(self.members, self.learns_variance)],
                dtype=self.dtype,
                device=self.device,
            )
            self.p_hid = self.p_out = None
            if self.s_hid is not None:
                if torch.isfinite(floors).any():
                    torch.maximum(self.s_hid, floors.view(1, -1, *([1] * (self.s_hid.dim() - 2))), out=self.s_hid)
                self.p_hid = torch.exp(-self.s_hid).unsqueeze(2)  # (H, R, 1, n or 1)
            if self.s_out is not None:
                if torch.isfinite(floors).any():
                    torch.maximum(self.s_out, floors.view(-1, *([1] * (self.s_out.dim() - 1))), out=self.s_out)
                self.p_out = torch.exp(-self.s_out).unsqueeze(1)  # (R, 1, n_out or 1)

    # ----------------------------------------------------------------- buffers
    def _allocate(self, batch: int) -> None:
        if self._buffers_for == batch:
            return
        H, R, n, n_out = self.H, self.R, self.sizes[1], self.sizes[-1]
        check_fits(R, self.sizes, batch, self.dtype, self.device)

        def new(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        self.X, self.A, self.MU, self.FP, self.E, self.G = (new(H, R, batch, n) for _ in range(6))
        self.EPS = new(H, R, batch, n) if self.s_hid is not None else self.E
        self.V = new(H, R, batch, n) if self.heavy_ball else self.X  # the velocity (heavy ball)
        self.feedback = new(max(H - 1, 1), R, batch, n)
        self.top_feedback = new(R, batch, n)
        self.x0, self.target = new(R, batch, self.sizes[0]), new(R, batch, n_out)
        self.aL, self.eL = new(R, batch, n_out), new(R, batch, n_out)
        self.epsL = new(R, batch, n_out) if (self.s_out is not None or self.output_loss == "ce") else self.eL
        self._buffers_for = batch

    def _flat(self, t: Tensor) -> Tensor:
        """(layers, R, a, b) as (layers * R, a, b): one batched product over every layer of every member."""
        return t.reshape(-1, *t.shape[2:])

    # ----------------------------------------------------------------- the loop's parts
    def _predict(self) -> None:
        first = 1  # the hidden rows whose prediction must be recomputed
        if not self._input_current:
            torch.baddbmm(self.b_in.unsqueeze(1), self.x0, self.w_in.transpose(1, 2), out=self.A[0])
            self._input_current, first = True, 0
        if self.w_hid is not None:
            w_t = self.w_hid_t if self.w_hid_t is not None else self.w_hid.transpose(2, 3)
            torch.baddbmm(
                self._flat(self.b_hid.unsqueeze(2)),
                self._flat(self.X[:-1]),
                self._flat(w_t),
                out=self._flat(self.A[1:]),
            )
        torch.baddbmm(self.b_out.unsqueeze(1), self.X[-1], self.w_out.transpose(1, 2), out=self.aL)
        self.activation.forward(self.A[first:], self.MU[first:])
        self.activation.derivative(self.A[first:], self.MU[first:], self.FP[first:])

    def _errors(self) -> None:
        torch.sub(self.X, self.MU, out=self.E)
        if self.p_hid is not None:
            torch.mul(self.E, self.p_hid, out=self.EPS)
        torch.mul(self.FP, self.EPS, out=self.G)
        if self.output_loss == "mse":
            torch.sub(self.target, self.aL, out=self.eL)
            if self.p_out is not None:
                torch.mul(self.eL, self.p_out, out=self.epsL)
        else:
            torch.softmax(self.aL, dim=2, out=self.epsL)
            torch.sub(self.target, self.epsL, out=self.epsL)
            self.eL.copy_(self.epsL)

    def recompute(self) -> None:
        self._predict()
        self._errors()

    def step(self) -> None:
        """One Jacobi step on every hidden activity of every active member: v <- beta v - gamma dE/dx; x <- x + v
        (beta = 0: plain descent). A frozen member has gamma = 0 and v = 0: it does not move."""
        V = self.V if self.heavy_ball else self.X  # plain descent moves the activities themselves
        if self.heavy_ball:
            V.mul_(self._beta)
        V.addcmul_(self.EPS, self._neg_gamma)
        if self.w_hid is not None:
            torch.bmm(self._flat(self.G[1:]), self._flat(self.w_hid), out=self._flat(self.feedback))
            V[:-1].addcmul_(self.feedback, self._gamma)
        torch.bmm(self.epsL, self.w_out, out=self.top_feedback)
        V[-1].addcmul_(self.top_feedback, self._gamma[0])
        if self.heavy_ball:
            self.X.add_(V)
        self.recompute()

    def feedforward_init(self, inputs: Tensor, target: Tensor) -> None:
        """x_l <- mu_l for every layer of every member, x_L clamped to the target; the hidden errors are zero."""
        self._allocate(inputs.shape[1])
        self.x0.copy_(inputs)
        self.target.copy_(target)
        torch.baddbmm(self.b_in.unsqueeze(1), self.x0, self.w_in.transpose(1, 2), out=self.A[0])
        self._input_current = True
        for l in range(self.H):
            if l > 0:
                assert self.w_hid is not None  # H > 1 means L > 2
                torch.baddbmm(
                    self.b_hid[l - 1].unsqueeze(1), self.X[l - 1], self.w_hid[l - 1].transpose(1, 2), out=self.A[l]
                )
            self.activation.forward(self.A[l], self.MU[l])
            self.X[l].copy_(self.MU[l])
        self.activation.derivative(self.A, self.MU, self.FP)
        torch.baddbmm(self.b_out.unsqueeze(1), self.X[-1], self.w_out.transpose(1, 2), out=self.aL)
        for buffer in (self.E, self.EPS, self.G) + ((self.V,) if self.heavy_ball else ()):
            buffer.zero_()
        self._errors()

    def set_schedule(self, active: Tensor) -> None:
        """Each member's step size and momentum as broadcastable tensors; inactive members get 0 for both, so their
        velocity is zeroed at the next step and their activities stay where they stopped."""
        gamma = torch.tensor([m.inference.step_size for m in self.members], dtype=self.dtype, device=self.device)
        beta = torch.tensor([m.inference.momentum for m in self.members], dtype=self.dtype, device=self.device)
        gamma, beta = gamma * active, beta * active
        self._gamma = gamma.view(1, -1, 1, 1)
        self._neg_gamma, self._beta = -self._gamma, beta.view(1, -1, 1, 1)

    # ----------------------------------------------------------------- measurements (per member, shape (R,))
    def error_energy(self) -> Tensor:
        B = self.X.shape[2]
        hidden = (self.E * self.EPS).sum(dim=(0, 2, 3))
        if self.output_loss == "ce":
            return 0.5 * hidden / B - (self.target * torch.log_softmax(self.aL, dim=2)).sum(dim=(1, 2)) / B
        return 0.5 * (hidden + (self.eL * self.epsL).sum(dim=(1, 2))) / B

    def log_variance_energy(self) -> Tensor:
        total = torch.zeros(self.R, dtype=self.dtype, device=self.device)
        n = self.sizes
        if self.s_hid is not None:
            total = total + 0.5 * self.s_hid.sum(dim=(0, 2)) * (n[1] // self.s_hid.shape[-1])
        if self.s_out is not None:
            total = total + 0.5 * self.s_out.sum(dim=1) * (n[-1] // self.s_out.shape[-1])
        return total

    def write_gradients(self) -> None:
        """dE/dtheta of each member's batch-mean energy into its parameters' ``.grad`` (views of the grad stacks)."""
        B = self.X.shape[2]
        scale = -1.0 / B
        torch.baddbmm(self.gw_in, self.G[0].transpose(1, 2), self.x0, beta=0.0, alpha=scale, out=self.gw_in)
        torch.sum(self.G[0], dim=1, out=self.gb_in).mul_(scale)
        if self.w_hid is not None:
            gw = self._flat(self.gw_hid)
            torch.baddbmm(
                gw, self._flat(self.G[1:]).transpose(1, 2), self._flat(self.X[:-1]), beta=0.0, alpha=scale, out=gw
            )
            torch.sum(self.G[1:], dim=2, out=self.gb_hid).mul_(scale)
        torch.baddbmm(self.gw_out, self.epsL.transpose(1, 2), self.X[-1], beta=0.0, alpha=scale, out=self.gw_out)
        torch.sum(self.epsL, dim=1, out=self.gb_out).mul_(scale)
        if self.s_hid is not None:
            assert self.p_hid is not None
            per_neuron = 0.5 - 0.5 * self.E.pow(2).mean(dim=2) * self.p_hid.squeeze(2)
            self.gs_hid.copy_(
                per_neuron if self.gs_hid.shape[-1] == per_neuron.shape[-1] else per_neuron.sum(-1, keepdim=True)
            )
        if self.s_out is not None:
            assert self.p_out is not None
            per_neuron = 0.5 - 0.5 * self.eL.pow(2).mean(dim=1) * self.p_out.squeeze(1)
            self.gs_out.copy_(
                per_neuron if self.gs_out.shape[-1] == per_neuron.shape[-1] else per_neuron.sum(-1, keepdim=True)
            )

    # ----------------------------------------------------------------- one training batch for every member
    @torch.no_grad()
    def train_batch(
        self, inputs: Tensor, target: Tensor, apply_updates: Sequence[Callable[[], None]], trace_energy: bool = False
    ) -> list[BatchResult]:
        """``schedule.train_batch`` for every member at once: ``inputs`` (R, B, n_in), ``target`` (R, B, n_out),
        ``apply_updates[r]`` steps member r's optimizer. Each member stops, updates and counts as it would alone."""
        return _PackedBatch(self, inputs, target, apply_updates, trace_energy).run()


class _PackedBatch:
    """The bookkeeping of one packed batch: each member's own checks, convergence, updates and results."""

    def __init__(self, pop: Population, inputs: Tensor, target: Tensor, apply_updates, trace_energy: bool) -> None:
        self.pop, self.apply_updates = pop, list(apply_updates)
        self.inferences = [m.inference for m in pop.members]
        first = self.inferences[0]
        self.steps, self.check_every = first.steps, first.check_every
        self.every = first.update_every or first.steps
        pop.feedforward_init(inputs, target)
        self.logits = pop.aL.clone()
        # each member's output loss, as alone (energy.output_loss over the run dimension)
        self.loss = torch.vmap(output_loss, in_dims=(0, 0, None))(self.logits, target, pop.output_loss)
        self.energy_start = pop.error_energy()
        self.trace = [self.energy_start] if trace_energy else None
        R = pop.R
        self.active = [True] * R
        self.updates, self.steps_used = [0] * R, [self.steps] * R
        self.tolerance_ref = self.energy_start.clone()
        self.rise_ref = self.energy_start.clone()
        self.energy_end = self.energy_start.clone()
        self.rises = torch.zeros(R, dtype=torch.int64, device=self.energy_start.device)
        self.log_variance_energy = [torch.zeros((), dtype=pop.dtype, device=pop.device)] * R
        pop.set_schedule(self._active_tensor())

    def _active_tensor(self) -> Tensor:
        return torch.tensor(self.active, dtype=self.pop.dtype, device=self.pop.device)

    def _check(self, t: int, last: bool) -> list[bool]:
        """Every ``check_every`` steps (and the last): rises counted, convergence judged (per member)."""
        pop = self.pop
        converged = [False] * pop.R
        current = self.trace[-1] if self.trace is not None else pop.error_energy()
        active = self._active_tensor().bool()
        self.rises += (current > self.rise_ref) & active
        self.rise_ref = torch.where(active, current, self.rise_ref)
        if t % self.check_every == 0 and not last:
            values, refs = current.tolist(), self.tolerance_ref.tolist()
            for r, inference in enumerate(self.inferences):
                if self.active[r] and inference.tolerance is not None:
                    converged[r] = bool(plateaued(refs[r], values[r], inference.tolerance))
            self.tolerance_ref = torch.where(active, current, self.tolerance_ref)
        ending = torch.tensor([a and (last or c) for a, c in zip(self.active, converged)], device=current.device)
        self.energy_end = torch.where(ending, current, self.energy_end)
        return converged

    def _update(self, t: int, last: bool, converged: list[bool]) -> None:
        """The weight updates due at step t: every member on schedule (``update_every``), and each that converged."""
        pop = self.pop
        due = [a and (t % self.every == 0 or c) for a, c in zip(self.active, converged)]
        if not any(due):
            return
        pop.write_gradients()
        for r in range(pop.R):
            if due[r]:
                self.apply_updates[r]()
                self.updates[r] += 1
        pop.parameters_changed()
        if not last:
            pop.recompute()
            energy = pop.error_energy()
            again = torch.tensor([d and not c for d, c in zip(due, converged)], device=energy.device)
            self.rise_ref = torch.where(again, energy, self.rise_ref)  # rises are counted within inference

    def run(self) -> list[BatchResult]:
        pop = self.pop
        for t in range(1, self.steps + 1):
            pop.step()
            if self.trace is not None:
                self.trace.append(pop.error_energy())
            last = t == self.steps
            converged = self._check(t, last) if (t % self.check_every == 0 or last) else [False] * pop.R
            self._update(t, last, converged)
            if any(converged):
                energy = pop.log_variance_energy()
                for r in (r for r in range(pop.R) if converged[r]):
                    self.steps_used[r], self.active[r] = t, False
                    self.log_variance_energy[r] = energy[r]
                pop.set_schedule(self._active_tensor())
            if not any(self.active):
                break
        energy = pop.log_variance_energy()
        for r in (r for r in range(pop.R) if self.active[r]):
            self.log_variance_energy[r] = energy[r]
        return [self._result(r) for r in range(pop.R)]

    def _result(self, r: int) -> BatchResult:
        trace = None
        if self.trace is not None:
            trace = torch.stack([e[r] for e in self.trace[: self.steps_used[r] + 1]])
        return BatchResult(
            loss=self.loss[r],
            logits=self.logits[r],
            energy_start=self.energy_start[r],
            energy_end=self.energy_end[r],
            updates=self.updates[r],
            energy_trace=trace,
            steps_used=self.steps_used[r],
            energy_rises=self.rises[r],
            log_variance_energy=self.log_variance_energy[r],
        )
