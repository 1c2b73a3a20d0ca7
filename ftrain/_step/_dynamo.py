"""ftrain's one ``torch.compile`` call, the dynamo settings it runs under, and what dynamo's
errors and graph breaks are reported as.

The settings hold only while a compiled step runs (dynamo reads them when it traces, which is
inside that call) and are put back after, so nothing else in the process sees them:

- logging and ``warnings`` calls inside the model are skipped in the graph (transformers'
  ``logger.warning_once`` otherwise stops ``fullgraph`` tracing). They still run once, in the
  step's check on fake tensors before the first compile;
- ``torch.autograd.grad`` is traced into the graph (the step's gradient is plain autograd);
- inductor's ``deterministic`` setting follows torch's deterministic flag, as
  ``torch.use_deterministic_algorithms`` would set it (a step sets the flag alone: the public
  setter imports the compiler, ~1.3 s, which a step served from the cache never needs).
"""

from __future__ import annotations

import logging
import re
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._checks import is_user_code

__all__ = ["GraphBreaks", "Scoped", "Settings", "compile_fn", "own_code", "untraceable"]

_LEVELS = ("debug", "info", "warn", "error", "exception", "critical", "fatal", "log")

UNTRACEABLE = (
    "{kind}: torch.compile(fullgraph=True) cannot trace {what}{where}\n"
    "Make that code traceable (torch.where for a branch on a tensor, tensors for Python numbers), or pass "
    "make_{kind}(..., fullgraph=False) to let the step break into several graphs there (slower), "
    "or compile=False."
)


def _skipped() -> set[Callable[..., Any]]:
    # Logger's own level methods and those libraries add to the class (transformers: warning_once).
    names = [name for name in vars(logging.Logger) if name.startswith(_LEVELS)]
    return {getattr(logging.Logger, name) for name in names} | {warnings.warn, warnings.warn_explicit}


class Settings:
    """The dynamo settings of ftrain's compiled calls, set on enter and put back on exit (the skipped
    functions are added to dynamo's set in place, and only those it lacked are removed). ~13 us:
    entered only around calls that may trace (see :class:`Scoped`)."""

    __slots__ = ("added", "autograd", "deterministic")

    def __enter__(self) -> None:
        import torch._inductor.config as inductor_config

        self.deterministic = inductor_config.deterministic
        inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
        config = torch._dynamo.config
        ignored = config.ignore_logging_functions
        self.added = _skipped() - ignored
        ignored |= self.added
        self.autograd = config.trace_autograd_ops
        if not self.autograd:
            config.trace_autograd_ops = True

    def __exit__(self, *exc: object) -> None:
        config = torch._dynamo.config
        config.ignore_logging_functions -= self.added
        if not self.autograd:
            config.trace_autograd_ops = False
        torch._inductor.config.deterministic = self.deterministic


class Scoped:
    """``fn`` called under ftrain's dynamo settings (dynamo traces inside the call, so that is where they hold).

    A :class:`CachedCompile` made with ``scope=Settings`` needs no wrapper: it enters them itself,
    on its slow path, the only one where dynamo may trace (a steady call runs its loaded function,
    guarded, no dynamo).
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        with Settings():
            return self.fn(*args)


def compile_fn(fn: Callable, *, fullgraph: bool, backend: Callable) -> Callable:
    """``torch.compile(fn, fullgraph=fullgraph, backend=backend)``, called under ftrain's dynamo settings."""
    return Scoped(torch.compile(own_code(fn), fullgraph=fullgraph, backend=backend))


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its graphs, and counts recompiles against
    its limit (8), per code object: every step's core is the same function body (a closure over
    its loss_fn), so without this the ninth step made in a process would fail to compile."""
    if not isinstance(fn, types.FunctionType):
        return fn
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return own


def untraceable(kind: str, error: BaseException) -> str | None:
    """The few-line message for dynamo's refusal to trace something under ``fullgraph``, else ``None``."""
    if not isinstance(error, torch._dynamo.exc.Unsupported):
        return None
    explanation = re.search(r"Explanation: (.*)", error.msg or "")
    what = f"`{error.gb_type}`" + (f" ({explanation.group(1).strip()})" if explanation else "")
    return UNTRACEABLE.format(kind=kind, what=what, where=_user_frame_of(getattr(error, "real_stack", None)))


def _user_frame_of(stack: Any) -> str:
    frames = [f for f in stack or () if is_user_code(f.filename)]
    return f"\n  at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


class GraphBreaks(logging.Handler):
    """Collects dynamo's graph-break reports while active: ``breaks`` is ``[(file:line, reason)]``."""

    _BREAK = re.compile(r"Graph break (?:\(.*?\) )?in user code at (\S+)\nGraph Break Reason: (?:.*?:\n\n)?(.*)")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.breaks: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = self._BREAK.match(record.getMessage())
        if found and found.group(1) not in (where for where, _ in self.breaks):
            self.breaks.append((found.group(1), found.group(2).strip()))

    def __enter__(self) -> GraphBreaks:
        import torch._dynamo.symbolic_convert  # (here, not at import: importing dynamo takes seconds)

        log = torch._dynamo.symbolic_convert.graph_break_log
        self._saved = (log.level, log.propagate)
        log.addHandler(self)
        log.setLevel(logging.DEBUG)
        log.propagate = False  # (collected here, not printed)
        return self

    def __exit__(self, *exc: object) -> None:
        log = torch._dynamo.symbolic_convert.graph_break_log
        log.removeHandler(self)
        log.setLevel(self._saved[0])
        log.propagate = self._saved[1]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.breaks)
