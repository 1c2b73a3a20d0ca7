"""``ftrain.summary``: what a state holds, per module, and what one train step costs in FLOPs.

Nothing runs for real: the step runs once on fake tensors (shapes and dtypes only) under
``torch.utils.flop_counter.FlopCounterMode``, which counts the matmul-like ops (linear, conv,
attention, bmm) of the forward, the backward and the update. Elementwise ops are not counted,
as in every FLOP count used for MFU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from . import tree
from ._step._grad import default_predict, train_core
from ._validate import check_int
from .precision import Policy


@dataclasses.dataclass(frozen=True)
class ModuleSummary:
    """One row of a :class:`Summary`: a module (params grouped by their first ``depth`` name parts)."""

    name: str
    type: str
    params: int
    trainable: int
    bytes: int
    dtypes: tuple[str, ...]
    flops: int | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """What :func:`summary` returns: rows per module and totals. ``str()`` is the printable table.

    ``flops`` is per train step (forward, backward and update) when a ``loss_fn`` was given,
    else per forward of the model on the batch's inputs (``flops_are_forward_only``).
    ``as_dict()`` is the same as plain data (for a writer's ``write_hparams`` or JSON).
    """

    modules: tuple[ModuleSummary, ...]
    params: int
    trainable: int
    param_bytes: int
    buffer_bytes: int
    flops: int
    flops_are_forward_only: bool

    @property
    def frozen(self) -> int:
        """Parameters the optimizer leaves unchanged (``optim.set_to_zero`` groups)."""
        return self.params - self.trainable

    def as_dict(self) -> dict[str, Any]:
        """The totals as ``{name: number}`` (``params``, ``trainable_params``, ``flops_per_step``, ...)."""
        flops = "flops_per_forward" if self.flops_are_forward_only else "flops_per_step"
        return {
            "params": self.params,
            "trainable_params": self.trainable,
            "frozen_params": self.frozen,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            flops: self.flops,
        }

    def __str__(self) -> str:
        head = ("module", "type", "params", "trainable", "bytes", "dtype", "FLOPs")
        rows = [head] + [
            (m.name, m.type, f"{m.params:,}", f"{m.trainable:,}", _human(m.bytes, "B"), ",".join(m.dtypes),
             "-" if m.flops is None else _human(m.flops, ""))
            for m in self.modules
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        per = "forward (no loss_fn given)" if self.flops_are_forward_only else "train step"
        lines += [
            "-" * len(lines[0]),
            f"params {self.params:,} (trainable {self.trainable:,}, frozen {self.frozen:,}); "
            f"params {_human(self.param_bytes, 'B')}, buffers {_human(self.buffer_bytes, 'B')}",
            f"FLOPs per {per}: {_human(self.flops, '')} ({self.flops:,})",
        ]
        return "\n".join(lines)


def summary(state: Any, batch: Any, loss_fn: Callable | None = None, *, depth: int = 1) -> Summary:
    """A per-module table of ``state``'s params and the FLOPs of one step on ``batch``.

    Args:
        state: a :class:`ftrain.TrainState` (of an ``nn.Module``).
        batch: one batch as the step gets it; only its shapes and dtypes are used.
        loss_fn: the ``loss_fn`` of :func:`ftrain.make_train_step`: the FLOPs are then those of
            a whole train step (forward, backward, optimizer update), and ``trainable`` counts
            the params whose update depends on their gradient (a group under
            ``optim.set_to_zero`` is frozen). Without it: FLOPs of the model's forward on the
            batch (on ``batch[0]`` for a tuple), all params counted as trainable.
        depth: group params by the first ``depth`` parts of their names (``1``: the model's
            children).

    Runs nothing for real: the step runs on fake tensors under
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention).

    Example:
        >>> import torch, ftrain
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> state = ftrain.TrainState.create(net, ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> s = ftrain.summary(state, torch.ones(16, 4), loss_fn)
        >>> s.params, s.flops   # forward 2*16*(4*8 + 8*2), backward the same for the weights, 2*16*8*2 for layer 2's input
        (58, 3584)
        >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
        module  type    params  trainable  bytes  dtype    FLOPs
        --------------------------------------------------------
        0       Linear      40         40  160 B  float32   2.0K
        2       Linear      18         18   72 B  float32   1.5K
        --------------------------------------------------------
        params 58 (trainable 58, frozen 0); params 232 B, buffers 0 B
        FLOPs per train step: 3.6K (3,584)
    """
    check_int(depth, "depth", who="summary")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
    fake_state, fake_batch = tree.map(fake, state), tree.map(fake, batch)
    counter = FlopCounterMode(display=False)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, fake_log.disabled = fake_log.disabled, True  # it logs every meta kernel it falls back from
    try:
        with fake_mode:
            with counter:
                if loss_fn is None:
                    default_predict(
                        fake_state.apply_fn, fake_state.params, fake_state.buffers, fake_batch, fake_state.key
                    )
                else:
                    train_core(loss_fn, Policy.coerce(None), 1, None, step_metrics=False)(fake_state, fake_batch)
            trainable = _trainable(fake_state) if loss_fn is not None else dict.fromkeys(state.params, True)
    finally:
        fake_log.disabled = disabled
    module = getattr(state.apply_fn, "module", None)
    root = type(module).__name__ if module is not None else None
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    groups: dict[str, list[str]] = {}
    for name in state.params:
        groups.setdefault(".".join(name.split(".")[:depth]), []).append(name)
    rows = []
    for prefix, names in groups.items():
        tensors = [state.params[n] for n in names]
        is_param = prefix not in state.params  # a module, not a bare parameter at the top
        kind = type(module.get_submodule(prefix)).__name__ if module is not None and is_param else "Parameter"
        rows.append(
            ModuleSummary(
                name=prefix,
                type=kind,
                params=sum(t.numel() for t in tensors),
                trainable=sum(t.numel() for n, t in zip(names, tensors) if trainable[n]),
                bytes=sum(t.numel() * t.element_size() for t in tensors),
                dtypes=tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})),
                flops=by_module.get(f"{root}.{prefix}") if is_param else None,
            )
        )
    return Summary(
        modules=tuple(rows),
        params=sum(r.params for r in rows),
        trainable=sum(r.trainable for r in rows),
        param_bytes=sum(r.bytes for r in rows),
        buffer_bytes=sum(b.numel() * b.element_size() for b in state.buffers.values()),
        flops=counter.get_total_flops(),
        flops_are_forward_only=loss_fn is None,
    )


def _trainable(state: Any) -> dict[str, bool]:
    """Which params the optimizer really updates: those whose update depends on their gradient.

    The update is traced on ``state``'s fake tensors into a graph (``make_fx``, under the fake
    mode); an update made of zeros (``optim.set_to_zero``) has no path back to its gradient.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    names = list(state.params)

    def update(grads: dict, opt_state: Any, params: dict) -> list:
        updates, _ = state.tx.update(grads, opt_state, params)
        return [updates[n] for n in names]

    grads = {n: torch.empty_like(p) for n, p in state.params.items()}
    graph = make_fx(update)(grads, state.opt_state, state.params).graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][: len(names)]  # grads come first
    output = next(n for n in graph.nodes if n.op == "output")
    trainable = {}
    for name, grad, out in zip(names, placeholders, output.args[0]):
        trainable[name] = isinstance(out, torch.fx.Node) and grad in _ancestors(out)
    return trainable


_SHAPE_ONLY = ("zeros_like", "ones_like", "empty_like", "full_like")  # read a tensor's shape, not its values


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes whose values ``node``'s value depends on."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if not (n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in _SHAPE_ONLY):
                todo.extend(n.all_input_nodes)
    return seen


def _human(n: float, unit: str) -> str:
    """``1234567 -> '1.2M'``; bytes in powers of 1024."""
    base, prefixes = (1024, ("", "Ki", "Mi", "Gi", "Ti")) if unit == "B" else (1000, ("", "K", "M", "G", "T", "P"))
    for p in prefixes:
        if abs(n) < base or p == prefixes[-1]:
            text = f"{n:.0f}" if p == "" else f"{n:.1f}"
            return f"{text} {p}{unit}" if unit else text + p
        n /= base
    raise AssertionError("unreachable")


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the specific names come before the general ones.
KNOWN_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
)


def peak_flops(device: torch.device | str = "cpu", *, size: int = 1024, repeats: int = 5) -> float:
    """The peak FLOP/s of ``device``, for MFU: a known GPU's data-sheet number, else measured.

    A GPU listed in :data:`KNOWN_PEAKS` (by ``torch.cuda.get_device_name``) gets its dense
    bf16 peak; any other device gets the best of ``repeats`` timed float32 ``size x size``
    matmuls (what this process can reach with its threads, the honest denominator on a CPU).

    Example:
        >>> peak_flops("cpu", size=64, repeats=2) > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for known, peak in KNOWN_PEAKS:
            if known in name:
                return peak
    import time

    a = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        t = time.perf_counter()
        (a @ a).sum().item()  # .item(): wait for the device
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best
