"""Sweeps: N settings of one model trained at once, by one compiled, vmapped step, through ``fit``.

A sweep is one :class:`SweepState`: N ordinary :class:`~ftrain.TrainState` members stacked leaf
by leaf (every tensor gains a leading member dim), a boolean ``active`` mask, and the shared step
count ``fit`` reads. Members differ in what is data in a state: injected hyperparameters
(:func:`ftrain.optim.inject_hyperparams`: learning rate, weight decay, betas, a schedule's peak),
seeds (initial weights and dropout keys) and any argument of the model factory (an init scale).
Shapes must match: a sweep over widths is N separate runs.

- :func:`grid` and :func:`zip_settings` build the list of settings; :func:`create` builds the sweep.
- :func:`train_step` / :func:`eval_step` turn one member's step into the sweep's: every member sees
  the same batch; per-member metrics come out as ``"loss/3"`` (``fit`` logs ``train/loss/3``,
  evaluation ``val/loss/3``) beside the mean over active members (``"loss"``) and ``"active"``.
- A member whose loss is not finite is frozen at its last finite state and masked out (the mask
  is a tensor in the state: no recompile); :func:`deactivate` and :class:`EarlyStopMembers` stop
  members on purpose. A frozen member still costs its share of each step.
- :func:`best` picks a member by a metric; :meth:`SweepState.member` unstacks one into an
  ordinary ``TrainState``.

Example (eager here; ``compile=True`` compiles the whole sweep step as one graph):
    >>> import torch, ftrain
    >>> from ftrain import optim, sweep
    >>> def loss_fn(apply, params, buffers, batch, key):
    ...     x, y = batch
    ...     return (apply(params, buffers, x)[0] - y).square().mean()
    >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    >>> state = sweep.create(lambda: torch.nn.Linear(3, 1), tx, sweep.grid(learning_rate=[0.01, 0.1]))
    >>> step = sweep.train_step(ftrain.make_train_step(loss_fn), compile=False)
    >>> batch = (torch.ones(8, 3), torch.zeros(8, 1))
    >>> state = ftrain.fit(state, step, [batch] * 5, num_epochs=1, progress=False)
    >>> i, member = sweep.best(state, ftrain.evaluate(state, sweep.eval_step(ftrain.make_eval_step(loss_fn),
    ...                        compile=False), [batch]), "loss")
    >>> i, state.setting(i), int(member.step)
    (1, {'learning_rate': 0.1}, 5)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import random, tree
from ._state import TrainState
from ._step import EvalStep, TrainStep, compile_step, stack_states
from ._validate import check_int, check_number, check_one_of
from .actions import Action, Run
from .optim import GradientTransformation, get_hyperparams, set_hyperparams

__all__ = [
    "EarlyStopMembers",
    "SweepState",
    "best",
    "create",
    "deactivate",
    "eval_step",
    "grid",
    "member_values",
    "train_step",
    "zip_settings",
]

SEED = "seed"

UNKNOWN_SETTING = (
    "sweep.create: settings[{index}] sets {names}, which this sweep cannot vary. A setting may name "
    "an injected hyperparameter of the optimizer ({injected}), an argument of make_model ({model_args}), "
    "or 'seed'. To sweep another optimizer argument, build tx with optim.inject_hyperparams(factory) "
    "where factory takes it as an argument (floats become tensors in the state)."
)

SCHEDULED = (
    "sweep.create: {name!r} follows a schedule (each update recomputes it), so setting it per member "
    "has no effect. Sweep the schedule's peak instead: inject a factory that takes the peak, e.g. "
    "def make_tx(peak): return optim.adamw(lambda count: peak * shape(count)), with shape the "
    "schedule with peak 1, and sweep 'peak'."
)


# ---------------------------------------------------------------- settings


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the values given per name (the last name varies fastest).

    >>> grid(learning_rate=[0.1, 0.01], seed=[0, 1])
    [{'learning_rate': 0.1, 'seed': 0}, {'learning_rate': 0.1, 'seed': 1}, {'learning_rate': 0.01, 'seed': 0}, {'learning_rate': 0.01, 'seed': 1}]
    """
    _check_axes(axes, "grid")
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def zip_settings(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Settings paired up position by position: member i takes the i-th value of every name.

    For a random search, draw the values yourself and zip them. Every list must be as long.

    >>> zip_settings(learning_rate=[0.1, 0.01], weight_decay=[0.0, 1e-4])
    [{'learning_rate': 0.1, 'weight_decay': 0.0}, {'learning_rate': 0.01, 'weight_decay': 0.0001}]
    """
    _check_axes(axes, "zip_settings")
    lengths = {name: len(values) for name, values in axes.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"sweep.zip_settings: every name needs one value per member, but the lengths differ: {lengths}; "
            "give each list the same length, or use sweep.grid for every combination"
        )
    names = list(axes)
    return [dict(zip(names, values)) for values in zip(*(axes[n] for n in names))]


def _check_axes(axes: Mapping[str, Any], who: str) -> None:
    if not axes:
        raise ValueError(f"sweep.{who} needs at least one name=[values...], got none")
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise TypeError(f"sweep.{who}: {name} must be a non-empty list of values, got {values!r}")


# ---------------------------------------------------------------- the state


@dataclasses.dataclass(frozen=True, eq=False)
class SweepState:
    """N members trained together: ``members`` (a stacked ``TrainState``), ``active`` and ``step``.

    Leaves: ``step`` (0-d int64, the steps the sweep has taken: what ``fit`` and checkpoints
    count), ``members`` (every leaf with a leading member dim; ``members.step[i]`` is the steps
    member ``i`` actually trained) and ``active`` (bool, one per member). Static: ``settings``,
    each member's setting as ``(name, value)`` pairs. Build one with :func:`create`.
    """

    step: torch.Tensor
    members: TrainState
    active: torch.Tensor
    settings: tuple[tuple[tuple[str, Any], ...], ...] = dataclasses.field(metadata={"static": True})

    @property
    def size(self) -> int:
        """The number of members."""
        return len(self.settings)

    @property
    def apply_fn(self) -> Callable[..., Any]:
        # The steps put the model in train or eval mode through the state's apply_fn.
        return self.members.apply_fn

    def setting(self, i: int) -> dict[str, Any]:
        """Member ``i``'s setting, as given to :func:`create`."""
        return dict(self.settings[self._index(i)])

    def member(self, i: int) -> TrainState:
        """Member ``i`` as an ordinary ``TrainState`` (its tensors are views into the sweep's)."""
        i = self._index(i)
        return tree.map(lambda x: x[i] if isinstance(x, torch.Tensor) else x, self.members)

    def replace(self, **changes: Any) -> SweepState:
        """A new sweep state with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def _index(self, i: int) -> int:
        if not isinstance(i, int) or isinstance(i, bool) or not -self.size <= i < self.size:
            raise IndexError(f"SweepState: member index must be an int in [0, {self.size}), got {i!r}")
        return i % self.size

    def __repr__(self) -> str:
        return f"SweepState(step={int(self.step)}, members={self.size}, active={int(self.active.sum())})"


def _flatten(state: SweepState) -> tuple[list, Any, tuple[str, ...]]:
    return [state.step, state.members, state.active], state.settings, ("step", "members", "active")


def _unflatten(settings: Any, children: list) -> SweepState:
    step, members, active = children
    return SweepState(step=step, members=members, active=active, settings=settings)


tree.register_node(SweepState, _flatten, _unflatten)


def create(
    make_model: Callable[..., nn.Module],
    tx: GradientTransformation,
    settings: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
) -> SweepState:
    """Build one member per setting and stack them into a :class:`SweepState`.

    Each member's model is ``make_model(**model_args)`` built under ``torch.manual_seed(seed)``
    (torch's global RNG is restored afterwards), its key is ``ftrain.random.key(seed)``, and its
    injected hyperparameters are set from the setting. A setting's names are sorted into those
    three: ``"seed"``, the optimizer's injected hyperparameters, and ``make_model``'s arguments.
    Members without a ``"seed"`` share ``seed``, so they start from the same weights.

    Args:
        make_model: builds the model; called once per member.
        tx: the optimizer, built through :func:`ftrain.optim.inject_hyperparams` for any
            hyperparameter the settings vary.
        settings: one mapping per member (:func:`grid`, :func:`zip_settings`, or your own list);
            every member names the same keys.
        seed: the seed of members whose setting has none.
    """
    check_int(seed, "seed", who="sweep.create", low=0)
    settings = [dict(s) for s in settings]
    if not settings:
        raise ValueError("sweep.create needs at least one setting, got an empty list")
    for i, s in enumerate(settings):
        if set(s) != set(settings[0]):
            raise ValueError(
                f"sweep.create: settings[{i}] names {sorted(s)} but settings[0] names {sorted(settings[0])}; "
                "every member must set the same names (give the shared value explicitly)"
            )
    model_args = set(inspect.signature(make_model).parameters)
    members = []
    for i, setting in enumerate(settings):
        member_seed = setting.get(SEED, seed)
        check_int(member_seed, f"settings[{i}]['seed']", who="sweep.create", low=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed)
            model = make_model(**{k: v for k, v in setting.items() if k in model_args})
        state = TrainState.create(model, tx, key=random.key(member_seed))
        injected = get_hyperparams(state.opt_state)
        unknown = sorted(set(setting) - injected.keys() - model_args - {SEED})
        if unknown:
            raise ValueError(
                UNKNOWN_SETTING.format(
                    index=i,
                    names=unknown,
                    injected=", ".join(sorted(injected)) or "none: tx was not built by optim.inject_hyperparams",
                    model_args=", ".join(sorted(model_args)) or "none",
                )
            )
        hyperparams = {k: v for k, v in setting.items() if k in injected}
        if hyperparams:
            state = state.replace(opt_state=set_hyperparams(state.opt_state, **hyperparams))
            if i == 0:
                _check_not_scheduled(state, list(hyperparams))
        members.append(state)
    stacked = stack_states(members)
    return SweepState(
        step=torch.zeros((), dtype=torch.int64, device=stacked.step.device),
        members=stacked,
        active=torch.ones(len(members), dtype=torch.bool, device=stacked.step.device),
        settings=tuple(tuple(s.items()) for s in settings),
    )


def _check_not_scheduled(state: TrainState, names: Sequence[str]) -> None:
    # Set each to an odd probe value and update once on zero gradients: a scheduled one comes back
    # recomputed, not as set (the probe keeps betas in [0, 1) and rates positive).
    current = get_hyperparams(state.opt_state)
    probe = {name: current[name] * 0.5 + 0.123 for name in names}
    opt_state = set_hyperparams(state.opt_state, **probe)
    with torch.no_grad():
        _, opt_state = state.tx.update(tree.zeros_like(state.params), opt_state, state.params)
    after = get_hyperparams(opt_state)
    for name in names:
        if not torch.equal(after[name], probe[name]):
            raise ValueError(SCHEDULED.format(name=name))


def deactivate(state: SweepState, members: Sequence[int]) -> SweepState:
    """``state`` with ``members`` masked out: from the next step on they keep their current values.

    The mask is a tensor in the state, so the compiled step is reused.

    >>> import torch, ftrain
    >>> tx = ftrain.optim.inject_hyperparams(ftrain.optim.sgd)(learning_rate=0.1)
    >>> s = create(lambda: torch.nn.Linear(2, 1), tx, grid(learning_rate=[0.1, 0.2, 0.3]))
    >>> deactivate(s, [1]).active
    tensor([ True, False,  True])
    """
    indices = [state._index(i) for i in members]
    active = state.active.clone()
    active[indices] = False
    return state.replace(active=active)


# ---------------------------------------------------------------- steps


class _Members:
    """A stacked state's tensor leaves as the flat list ``torch.func.vmap`` maps over, and back.

    Dynamo traces torch's pytree code op by op: given the whole state and per-leaf in/out-dims
    trees, vmap flattened and rebuilt it about a dozen times in the trace of every sweep step.
    The state is flattened once here, outside vmap, and rebuilt once inside (the member) and
    once after. Non-tensor leaves (``None`` placeholders) are constants of the step.
    """

    def __init__(self, state: Any):
        self.state = state
        self.leaves, self.spec = tree.traced_flatten(state)
        self.slots = [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.slots]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.leaves)
        for i, x in zip(self.slots, tensors):
            leaves[i] = x
        return tree.traced_unflatten(self.spec, leaves)

    def tensors_of(self, state: Any) -> list[torch.Tensor]:
        """The tensors of ``state``, a member's new state, in the slots of the members' own."""
        leaves, spec = tree.traced_flatten(state)
        if spec != self.spec:
            names = ["sweep: a member's state", "the state its train step returned"]
            tree.assert_same_structure(self.state, state, names=names)  # (names the paths that differ)
            raise ValueError(f"{names[0]} is {self.spec} but {names[1]} is {spec}")
        return [leaves[i] for i in self.slots]


def _report(metrics: Mapping[str, torch.Tensor], active: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-member metrics ``[N]`` as ``name/i`` (NaN for masked members), their mean over active members."""
    count = active.sum()
    out: dict[str, torch.Tensor] = {}
    for name, values in metrics.items():
        shown = torch.where(active, values, torch.full_like(values, math.nan))
        total = torch.where(active, values, torch.zeros_like(values)).sum()
        out[name] = total / count.clamp(min=1).to(values.dtype)
        out.update({f"{name}/{i}": v for i, v in enumerate(shown.unbind())})
    out["active"] = count.to(torch.float32)
    return out


def train_step(step: Callable[[Any, Any], Any], *, compile: bool = True, **compile_options: Any) -> TrainStep:
    """The sweep's train step from one member's: every active member takes a step on the same batch.

    ``step`` is a train step for one ``TrainState`` (:func:`ftrain.make_train_step`; compiled or
    not: inside ``vmap`` its pure core runs). A member whose new loss is not finite keeps its old
    state and is masked out. Metrics: ``"loss/i"`` etc. per member (NaN once masked), the mean
    over active members under the plain name, and ``"active"`` (how many still train).

    Args:
        step: ``step(state, batch) -> (state, metrics)`` for one member.
        compile: compile the whole sweep step as one graph (:func:`ftrain.compile_step`).
        compile_options: passed on to :func:`ftrain.compile_step` (``backend``, ``deterministic``, ...).
    """
    core = getattr(step, "core", step)

    def sweep_step(state: SweepState, batch: Any) -> tuple[SweepState, dict]:
        members = _Members(state.members)

        def member_step(tensors: list[torch.Tensor], active: torch.Tensor, batch: Any) -> tuple[list, Any, dict]:
            new, metrics = core(members.rebuild(tensors), batch)
            keep = active & torch.isfinite(metrics["loss"])
            return [torch.where(keep, x, old) for x, old in zip(members.tensors_of(new), tensors)], keep, metrics

        tensors, active, metrics = torch.func.vmap(member_step, in_dims=(0, 0, None))(
            members.tensors, state.active, batch
        )
        new = SweepState(step=state.step + 1, members=members.rebuild(tensors), active=active, settings=state.settings)
        return new, _report(metrics, active)

    return compile_step(sweep_step, compile=compile, **compile_options)


def eval_step(step: Callable[[Any, Any], Any], *, compile: bool = True, **options: Any) -> EvalStep:
    """The sweep's eval step from one member's (:func:`ftrain.make_eval_step`): every member on one batch.

    Metrics as in :func:`train_step`, except that masked members are evaluated too (a stopped
    member's metrics are those of its frozen state); the plain name is the mean over all members.
    """
    core = getattr(step, "core", step)

    def sweep_eval(state: SweepState, batch: Any) -> dict:
        members = _Members(state.members)

        def member_eval(tensors: list[torch.Tensor], batch: Any) -> dict:
            return core(members.rebuild(tensors), batch)

        metrics = torch.func.vmap(member_eval, in_dims=(0, None))(members.tensors, batch)
        return _report(metrics, torch.ones_like(state.active))

    defaults = {"deterministic": True, "new_shapes": "error"}
    return EvalStep(sweep_eval, compile=compile, **{**defaults, **options})


# ---------------------------------------------------------------- choosing and stopping


def member_values(metrics: Mapping[str, float], name: str, size: int) -> list[float]:
    """``[metrics["name/0"], ..., metrics[f"name/{size - 1}"]]``, with a clear error for a missing one."""
    prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    missing = [f"{name}/{i}" for i in range(size) if f"{name}/{i}" not in metrics]
    if missing:
        have = sorted({k.rsplit("/", 1)[0] for k in metrics if k.startswith(prefix) and k.rsplit("/", 1)[-1].isdigit()})
        raise KeyError(
            f"sweep: no per-member metric {missing[0]!r} (of {size} members); per-member metrics here: "
            f"{have or 'none'} (a sweep step reports each as 'name/i')"
        )
    return [float(metrics[f"{name}/{i}"]) for i in range(size)]


def best(state: SweepState, metrics: Mapping[str, float], name: str, *, mode: str = "min") -> tuple[int, TrainState]:
    """The member with the best ``name`` in ``metrics`` (e.g. ``ftrain.evaluate``'s), and its state.

    Members whose value is not finite (diverged) are skipped.

    Args:
        state: the sweep.
        metrics: per-member values as ``name/i`` (a sweep step's metrics, or ``val/acc/i`` from a run).
        name: the metric, without the member index (``"acc"``, ``"val/acc"``).
        mode: ``"min"`` or ``"max"``.
    """
    check_one_of(mode, "mode", ("min", "max"), who="sweep.best")
    values = member_values(metrics, name, state.size)
    finite = [(v if mode == "min" else -v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        raise ValueError(f"sweep.best: every member's {name} is non-finite ({values}); every member diverged")
    i = min(finite)[1]
    return i, state.member(i)


class EarlyStopMembers(Action):
    """Stop each member on its own when its ``monitor`` metric stops improving.

    After each evaluation that publishes ``monitor/i`` for every member (``val/loss/3``), a
    member that has not improved by ``min_delta`` for ``patience`` evaluations is masked out
    (:func:`deactivate`: no recompile); the run stops once no member trains.

    Args:
        monitor: the metric without the member index, e.g. ``"val/loss"``.
        mode: ``"min"`` or ``"max"``.
        patience: evaluations without improvement before a member stops.
        min_delta: how much better counts as improved.

    Attributes:
        stopped: ``{member: step it stopped at}``.
    """

    order = 10  # after Evaluate (-20) publishes, before Checkpoint (100) saves the new mask

    def __init__(self, monitor: str = "val/loss", *, mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        self.monitor = monitor
        self.mode = check_one_of(mode, "mode", ("min", "max"), who="EarlyStopMembers")
        self.patience = check_int(patience, "patience", who="EarlyStopMembers", low=1)
        self.min_delta = check_number(min_delta, "min_delta", who="EarlyStopMembers", low=0)

    def start(self, run: Run) -> None:
        self.best: list[float] | None = None
        self.bad: list[int] = []
        self.stopped: dict[int, int] = {}

    def __call__(self, run: Run) -> None:
        state = run.state
        if f"{self.monitor}/0" not in run.new:
            return
        values = member_values(run.new, self.monitor, state.size)
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None:
            self.best, self.bad = [math.inf] * state.size, [0] * state.size
        newly = []
        for i, v in enumerate(values):
            if i in self.stopped:
                continue
            if sign * v < self.best[i] - self.min_delta:
                self.best[i], self.bad[i] = sign * v, 0
            else:
                self.bad[i] += 1
                if self.bad[i] >= self.patience:
                    newly.append(i)
                    self.stopped[i] = run.step
        if newly:
            run.state = deactivate(state, newly)
        if len(self.stopped) == state.size:
            run.stop(f"EarlyStopMembers: every member stopped improving {self.monitor} for {self.patience} evaluations")
