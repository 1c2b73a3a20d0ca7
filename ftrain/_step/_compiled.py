"""The step objects: a pure core, compiled whole, plus the few cheap checks around each call.

A call checks that the state was not donated and compares the batch's signature (structure,
shapes, dtypes) with those seen; a new signature is first run on fake tensors
(:meth:`_Step._precheck`), so a bad loss or batch is a short :class:`StepError`, not a dynamo trace.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from .. import optim, tree
from .._module import ModuleApply
from .._state import TrainState
from .._validate import check_one_of
from . import _donate
from ._cache import CachedCompile
from ._checks import DonatedStateError, StepError, check_metrics, check_train_output, checks, step_failure, user_frame
from ._dynamo import UNTRACEABLE, GraphBreaks, Settings, compile_fn, own_code, untraceable

NewShapes = Literal["error", "recompile"]

PARTIAL_BATCH = (
    "{kind}: {where} has batch size {size} but the step was compiled for {size0}: a partial last batch? "
    "Drop it (ftrain.data.Loader(drop_last=True)) or pad it, or pass new_shapes='recompile' to allow one more "
    "compile with a dynamic batch dim"
)
READS_A_VALUE = (
    "reading a tensor's value in Python (`if tensor:`, `.item()`, `.tolist()`, a Python number from a tensor)"
)
TRACING_WARNINGS = (
    # dynamo makes an instance of each autograd.Function it traces
    (".*autograd.function.Function'> should not be instantiated", DeprecationWarning),
    # dynamo probes .grad on the non-leaf tensors a graph break hands to the next graph (fullgraph=False)
    ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning),
)
GRAPH_BREAKS = (
    "{kind} (fullgraph=False) compiled with {n} graph break(s), each a return to Python between graphs: {where}"
)


class _StepMode:
    """What a step runs under: no autograd recording, deterministic algorithms unless opted out,
    the module in train (or eval) mode; the previous settings come back on exit.

    An ``eager`` step that turns deterministic mode on leaves out torch's NaN fill of every fresh
    allocation (``torch.utils.deterministic.fill_uninitialized_memory``): it changes a result only
    where a kernel reads memory nobody wrote, costs a small model's eager step up to 6% (a write
    of every activation, gradient and optimizer output before the kernel's own: the zoo's ResNet
    6%, BERT and T5 2-3%), and inductor does not fill a compiled step's own buffers either. A
    process already in deterministic mode (turned on by the user) keeps its own fill setting.

    A plain class, not ``contextlib.contextmanager``: it is entered on every step (hot path).
    """

    __slots__ = ("state", "deterministic", "train_mode", "eager", "grad", "set_deterministic", "fill", "module")

    def __init__(self, state: Any, deterministic: bool, train_mode: bool, eager: bool = False):
        self.state, self.deterministic, self.train_mode, self.eager = state, deterministic, train_mode, eager

    def __enter__(self) -> None:
        self.grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        self.set_deterministic = self.deterministic and not torch.are_deterministic_algorithms_enabled()
        if self.set_deterministic:
            # (Not torch.use_deterministic_algorithms: it imports the compiler to tell inductor,
            # ~1.3 s, and costs an eager step ~12 us; a compile tells inductor itself, see _dynamo.Settings.)
            torch._C._set_deterministic_algorithms(True)
            if self.eager:
                self.fill = torch.utils.deterministic.fill_uninitialized_memory
                torch.utils.deterministic.fill_uninitialized_memory = False
        apply = getattr(self.state, "apply_fn", None)
        self.module = (
            apply.module if isinstance(apply, ModuleApply) and apply.module.training != self.train_mode else None
        )
        if self.module is not None:
            self.module.train(self.train_mode)

    def __exit__(self, *exc: object) -> None:
        if self.module is not None:
            self.module.train(not self.train_mode)
        if self.set_deterministic:
            if self.eager:
                torch.utils.deterministic.fill_uninitialized_memory = self.fill
            torch._C._set_deterministic_algorithms(False)
        torch._C._set_grad_enabled(self.grad)


class _CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is asked to compile."""

    def __init__(self, backend: str | Callable):
        self.inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        self.count += 1
        return self.inner(gm, example_inputs, **kwargs)


class _Step:
    kind = "step"
    _train_mode = True
    _any_batch_size = False  # (a cached library of it takes any batch size, when new shapes recompile)

    def __init__(
        self,
        core: Callable[..., Any],
        *,
        compile: bool,
        deterministic: bool,
        new_shapes: NewShapes,
        backend: str | Callable = "inductor",
        cache: bool = True,
        fullgraph: bool = True,
    ):
        self.new_shapes = check_one_of(new_shapes, "new_shapes", ("error", "recompile"), who=type(self).__name__)
        self.core = core
        self.compiled = compile
        self.deterministic = deterministic
        self.cache = cache
        self._backend = backend
        self.fullgraph = fullgraph
        self._models: dict[int, weakref.ref] = {}  # the models (apply_fns) checked so far, by identity
        self._counters: list[_CountingBackend | CachedCompile] = []
        self._fn = self._compile(core) if compile else core
        self._signature: tuple | None = None  # the first batch's
        self._seen: set[tuple] = set()  # every batch signature checked so far
        self._ran: set[int] = set()

    @property
    def num_compiles(self) -> int:
        """How many graphs were compiled for this step in this process (1 after the first call, 0 if it came from the cache)."""
        return sum(c.count for c in self._counters)

    @property
    def num_loads(self) -> int:
        """How many compiled graphs this step loaded from the persistent cache in this process.

        ``num_compiles + num_loads`` is the number of graphs the step has run: 1 for a step
        whose every call had the same kind of inputs, whether it compiled or was served warm.
        An uncompiled step runs no graph.

        Example:
            >>> import torch, ftrain
            >>> def loss_fn(apply, params, buffers, batch, key):
            ...     out, buffers = apply(params, buffers, batch)
            ...     return out.square().mean(), {}, buffers
            >>> step = ftrain.make_train_step(loss_fn, compile=False)
            >>> _ = step(ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1)), torch.ones(3, 2))
            >>> step.num_compiles, step.num_loads
            (0, 0)
        """
        return sum(c.hits for c in self._counters if isinstance(c, CachedCompile))

    def _compile(self, fn: Callable) -> Callable:
        if self.cache and self.fullgraph:  # served from the persistent cache, or compiled ahead of time and saved there
            any_size = self._any_batch_size and self.new_shapes == "recompile"
            cached = CachedCompile(own_code(fn), backend=self._backend, scope=Settings, any_batch_size=any_size)
            self._counters.append(cached)
            return cached  # (it enters the settings itself, on the path where dynamo may trace)
        counter = _CountingBackend(self._backend)
        self._counters.append(counter)
        return compile_fn(fn, fullgraph=self.fullgraph, backend=counter)

    def _direct(self) -> bool:
        # Under torch.func.vmap/grad or while dynamo traces an outer function, be just the pure core.
        return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None

    def _admit(self, state: Any, batch: Any, fn: Callable) -> None:
        _donate.check_alive(state)
        leaves, spec = tree.flatten(batch)  # (the hot path: paths only when something differs)
        signature = (spec, tuple((x.shape, x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves))
        seen, new_model = signature in self._seen, self.compiled and self._new_model(state)
        if seen and not new_model:
            return
        if not seen and self._signature is not None and self.new_shapes == "error":
            self._compare(signature, tree.flatten_with_path(batch)[0])
        if self.compiled and not self._served(fn, state, batch):
            self._precheck(state, batch)
        if self._signature is None:
            self._signature = signature
        if len(self._seen) < 64:  # (bounded: a stream of new shapes only re-runs the cheap fake check)
            self._seen.add(signature)

    def _new_model(self, state: Any) -> bool:
        """Is ``state``'s model object new to this step? Then it is checked on fake tensors first: a model
        may set attributes in its first forward (transformers sets ``config.problem_type``), and the
        compiled graph's guards must see the settled values, or a new state would recompile."""
        apply = getattr(state, "apply_fn", None)
        known = self._models.get(id(apply))
        if not isinstance(apply, ModuleApply) or (known is not None and known() is apply):
            return False
        if len(self._models) < 64:
            self._models[id(apply)] = weakref.ref(apply)
        return True

    def _compare(self, signature: tuple, paths: list[str]) -> None:
        spec0, sig0 = self._signature
        spec, sig = signature
        if spec != spec0:
            raise StepError(
                f"{self.kind}: this batch's structure {spec} differs from the first batch's {spec0}; "
                "every batch must have the same structure (or pass new_shapes='recompile')"
            )
        for path, a, b in zip(paths, sig, sig0):
            if a == b:
                continue
            where = f"batch{'' if path == '<root>' else path}"
            if not (isinstance(a, tuple) and isinstance(b, tuple)):
                raise StepError(
                    f"{self.kind}: {where} is {a!r} but was {b!r} in the first batch; non-tensor batch items must not change"
                )
            (shape, dtype), (shape0, dtype0) = a, b
            if dtype != dtype0:
                raise StepError(
                    f"{self.kind}: {where} has dtype {dtype} but the first batch had {dtype0}; "
                    f"cast it (x.to({dtype0})) so the compiled step is reused"
                )
            if len(shape) == len(shape0) >= 1 and shape[1:] == shape0[1:]:
                raise StepError(PARTIAL_BATCH.format(kind=self.kind, where=where, size=shape[0], size0=shape0[0]))
            raise StepError(
                f"{self.kind}: {where} has shape {tuple(shape)} but the first batch had {tuple(shape0)}; pass "
                "new_shapes='recompile' if shapes really vary (one recompile, then a dynamic-shape graph)"
            )

    def _served(self, fn: Callable, state: Any, batch: Any) -> bool:
        """Whether ``fn`` loaded its graph for this batch from the cache: it was checked before it was saved."""
        if not isinstance(fn, CachedCompile):
            return False
        # Under what the call runs under: the key and the guards cover grad mode and determinism (and
        # it enters dynamo's settings itself, only where it needs dynamo: importing it costs ~1.3 s).
        with self._context(state):
            return fn.prepare(state, batch)

    def _precheck(self, state: Any, batch: Any) -> None:
        """Run the step on fake tensors: catches bad losses and bad batches before dynamo sees them."""
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        fake_state, fake_batch = tree.map(fake, state), tree.map(fake, batch)
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        disabled, fake_log.disabled = fake_log.disabled, True  # it logs every failing meta kernel
        try:
            with checks(), fake_mode, self._context(state):
                out = self.core(fake_state, fake_batch)
            self._check_output(state, out)
        except (StepError, DonatedStateError):
            raise
        except DataDependentOutputException as e:
            if not self.fullgraph:  # (dynamo breaks the graph there; the fake check cannot go past it)
                return
            raise StepError(UNTRACEABLE.format(kind=self.kind, what=READS_A_VALUE, where=user_frame(e))) from None
        except Exception as e:
            raise step_failure(self.kind, batch, e, " (checked before compiling, on fake tensors)") from None
        finally:
            fake_log.disabled = disabled

    def _check_output(self, state: Any, out: Any) -> None:
        pass

    def _context(self, state: Any) -> _StepMode:
        return _StepMode(state, self.deterministic, self._train_mode, eager=not self.compiled)

    def _run(self, fn: Callable, state: Any, batch: Any, check_output: bool = True) -> Any:
        if id(fn) in self._ran:
            with self._context(state):
                return fn(state, batch)
        # The first call of fn: eager, it is checked on the real tensors.
        breaks = GraphBreaks() if self.compiled and not self.fullgraph else contextlib.nullcontext()
        with self._context(state), checks(not self.compiled), breaks, warnings.catch_warnings():
            # Warnings torch raises at its own tracing (meant for users' code; errors under -W error).
            for message, category in TRACING_WARNINGS:
                warnings.filterwarnings("ignore", message, category)
            try:
                out = fn(state, batch)
            except Exception as e:
                if not self.compiled:
                    raise
                message = untraceable(self.kind, e)
                if message is not None:
                    raise StepError(message) from None
                # A failure dynamo's fake tensors missed: the eager error names the real problem.
                eager_error = _eager_error(self.core, state, batch)
                if eager_error is None:
                    raise
                # (Not from the compiler's error: its trace is hundreds of lines.)
                raise step_failure(self.kind, batch, eager_error) from eager_error
        if not self.compiled and check_output:
            self._check_output(state, out)
        if isinstance(breaks, GraphBreaks) and breaks.breaks:
            where = "; ".join(f"{at} ({reason})" for at, reason in breaks)
            warnings.warn(GRAPH_BREAKS.format(kind=self.kind, n=len(breaks.breaks), where=where), stacklevel=3)
        self._ran.add(id(fn))
        return out


def _eager_error(core: Callable, state: Any, batch: Any) -> BaseException | None:
    try:
        core(state, batch)
    except Exception as e:
        return e
    return None


class TrainStep(_Step):
    """``train_step(state, batch) -> (new_state, metrics)``: pure; ``train_step.donate`` reuses memory.

    Made by :func:`make_train_step` or :func:`compile_step`. ``metrics`` is a dict of 0-d tensors
    (no host sync). Attributes: ``core`` (the uncompiled pure function), ``num_compiles``, ``num_loads``.
    """

    kind = "train_step"

    def __init__(self, core: Callable, *, in_place: bool = False, **kwargs: Any):
        super().__init__(core, **kwargs)
        self._donating: Callable | None = None
        # The core reads nothing of its input state after the optimizer update (make_train_step's,
        # without loss scaling), so an eager donation may let the update write into the input.
        self.in_place = in_place

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One pure step: ``state`` is left untouched."""
        if self._direct():
            return self.core(state, batch)
        self._admit(state, batch, self._fn)
        return self._run(self._fn, state, batch)

    def donate(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """The same step, computed into ``state``'s own memory (peak memory ~4x params instead of ~7x).

        (Eager, ``compile=False``: a ``make_train_step`` step's optimizer update writes into the
        input's params and moments, as torch.optim does; everything else goes to new tensors, as
        in the pure step, where copying them back would buy nothing.)
        ``state`` is consumed: its tensors now hold the new values, and any later use of it
        (another step, ``state.params``, a checkpoint) raises :class:`DonatedStateError`. Use the
        state this returns. Do not donate a state whose tensors are shared with something you
        still need (an async checkpoint still writing it, an EMA holding the same tensors).
        """
        if self._direct():
            return self.core(state, batch)
        _donate.check_alive(state)
        overwrites = self.compiled or self.in_place  # (the input's tensors get written)
        if overwrites and state not in _donate.TRUSTED:  # (first: a state that cannot be donated is refused as such)
            _donate.check_no_aliasing(state)
        if self.compiled:
            if self._donating is None:
                self._donating = self._compile(_donate.donating(self.core))
            self._admit(state, batch, self._donating)
            metrics = self._run(self._donating, state, batch, check_output=False)
            new_state = _donate.hand_over(state)
        else:
            # No graph whose outputs could be planned into the inputs: with ``in_place`` the
            # optimizer update writes into the input's params and moments (the same kernels, no
            # allocation); the rest is new tensors. The input is retired either way.
            self._admit(state, batch, self.core)
            writable = optim.updating_in_place(tree.leaves(state)) if self.in_place else contextlib.nullcontext()
            with writable:
                new_state, metrics = self._run(self.core, state, batch)
            _donate.retire(state)
        if overwrites:
            with contextlib.suppress(TypeError):  # (a plain dict state cannot be weakly referenced: checked each time)
                _donate.TRUSTED.add(new_state)
        return new_state, metrics

    def _check_output(self, state: Any, out: Any) -> None:
        check_train_output(state, out)


class EvalStep(_Step):
    """``eval_step(state, batch) -> metrics``, with the module in eval mode; made by :func:`make_eval_step`."""

    kind = "eval_step"
    _train_mode = False
    _any_batch_size = True
    mesh: Any = None  # the ftrain.Mesh that ftrain.evaluate reduces this step's metrics over (make_eval_step's)

    def __call__(self, state: TrainState, batch: Any) -> dict:
        """Metrics on one batch (0-d tensors, including ``"loss"``)."""
        if self._direct():
            return self.core(state, batch)
        self._admit(state, batch, self._fn)
        return self._run(self._fn, state, batch)

    def _check_output(self, state: Any, out: Any) -> None:
        check_metrics(out)


class PredictStep(EvalStep):
    """``predict_step(state, batch) -> outputs``, with the module in eval mode; see :func:`make_predict_step`."""

    kind = "predict_step"

    def _check_output(self, state: Any, out: Any) -> None:
        pass
