"""Steps compiled ahead of time into one shared library by AOTInductor, and called without dynamo.

The step's Python runs once on fake tensors under ``make_fx`` (with
``torch.compiler.is_compiling()`` true, as under ``torch.compile``), which records its ATen graph;
inductor compiles that graph, kernels and C++ wrapper, into a self-contained ``.so``; torch's C++
runner calls it with the flat input tensors. A later process loads the library in milliseconds and
imports neither dynamo nor inductor (about 1.3 s of imports), nor traces anything (1-5 s).

The library knows nothing of Python: what it was traced from is the caller's key, and what it was
planned for (each input's shape, stride, dtype and device, the inputs' tree structure and non-tensor
leaves) is checked here on every call. A step that captures a tensor outside its inputs (its values
would be compiled in), or needs an op the C++ runner cannot call, is refused at build time with the
reason; the caller compiles it another way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import tree

__all__ = ["MISS", "Library", "NotCompilable", "batch_leaves", "build", "load", "unsupported", "write_atomically"]

MISS = object()
"""What :meth:`Library.call` returns for inputs it was not built for."""

_PLAIN = (str, bytes, int, float, complex, bool, type(None), type, torch.dtype, torch.device)


class NotCompilable(Exception):
    """This step cannot be built into a library (the message says why)."""


def unsupported(leaves: list) -> str | None:
    """Why inputs with these (flattened) leaves cannot be served by a library, or ``None``."""
    if not hasattr(torch._C, "_aoti"):
        return f"torch {torch.__version__} has no AOTInductor runner"
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor:
                return f"an input is a {type(x).__name__}"
            if x.device.type != "cpu":
                return f"an input is on {x.device} (the library runner here is the CPU one)"
            if x.requires_grad or x.layout != torch.strided:
                return "an input requires grad or is not a strided tensor"
    return None


def _signature(leaves: list, dynamic: tuple[int, ...] = ()) -> list:
    """What a library checks of its inputs: each tensor's shape (less a ``dynamic`` one's first dim),
    strides, dtype and device; the other leaves themselves."""
    return [
        ((x.shape[1:] if i in dynamic else x.shape), x.stride(), x.dtype, x.device)
        if isinstance(x, torch.Tensor)
        else x
        for i, x in enumerate(leaves)
    ]


def _one_batch_size(leaves: list, dynamic: tuple[int, ...]) -> bool:
    sizes = {leaves[i].shape[0] for i in dynamic}
    return len(sizes) == 1 and sizes.pop() >= 2


class Library:
    """A loaded step library: ``call(args)`` runs it, or returns :data:`MISS` for inputs it was not planned for."""

    __slots__ = ("runner", "spec", "signature", "out_spec", "out_slots", "dynamic")

    def __init__(self, runner: Any, leaves: list, spec: Any, out_spec: Any, out_slots: list, dynamic: tuple = ()):
        self.runner, self.spec, self.dynamic = runner, spec, dynamic
        self.signature = _signature(leaves, dynamic)
        self.out_spec, self.out_slots = out_spec, out_slots

    def serves(self, args: tuple) -> bool:
        return self._fits(*tree.traced_flatten(args))

    def _fits(self, leaves: list, spec: Any) -> bool:
        if spec != self.spec or _signature(leaves, self.dynamic) != self.signature:
            return False
        return not self.dynamic or _one_batch_size(leaves, self.dynamic)

    def call(self, args: tuple) -> Any:
        leaves, spec = tree.traced_flatten(args)
        if not self._fits(leaves, spec):
            return MISS
        outs = self.runner.run([x for x in leaves if isinstance(x, torch.Tensor)])
        return tree.traced_unflatten(self.out_spec, [outs[s] if type(s) is int else s[0] for s in self.out_slots])

    def run(self, *args: Any) -> Any:
        out = self.call(args)
        if out is MISS:
            raise ValueError("this compiled step library was built for inputs of other shapes, dtypes or structure")
        return out


def build(
    fn: Callable,
    args: tuple,
    so_path: Path,
    *,
    graphs: Path,
    salt: str = "",
    options: dict | None = None,
    dynamic: tuple[int, ...] = (),
) -> tuple[Library, bytes]:
    """Trace ``fn(*args)``, compile it to ``so_path`` and load it: ``(library, metadata)``; raises :class:`NotCompilable`.

    ``metadata`` (bytes) is what :func:`load` needs besides the library: keep it with the file.
    ``graphs`` is a directory of libraries by the traced graph they compile (plus ``salt``: what
    else the compiler's output depends on, and ``options``): a step whose key changed but whose
    graph did not (an edited comment, a new cache directory with this one shared) is only traced.
    ``dynamic``: the flat leaves (see :func:`batch_leaves`) whose first dim is compiled as a size
    the library takes at each call (a batch size, 2 or more, the same for all of them).
    """
    import torch._inductor.codecache  # noqa: F401  (imported here, not by the probes' thread)
    from torch._export.utils import _compiling_state_context
    from torch.fx.experimental.proxy_tensor import make_fx

    leaves, spec = tree.traced_flatten(args)
    why = unsupported(leaves)
    if why is not None:
        raise NotCompilable(why)
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensors = [leaves[i] for i in where]
    traced: dict[str, Any] = {}
    probes = _Background(_probe_vector_isas)  # (meanwhile: the trace is Python, the probes compilers)
    inputs, shape_env = _symbolic(leaves, where, dynamic) if dynamic else (tensors, None)

    def flat(*inputs: torch.Tensor) -> tuple:
        full = list(leaves)
        for i, t in zip(where, inputs):
            full[i] = t
        out, traced["spec"] = tree.traced_flatten(fn(*tree.traced_unflatten(spec, full)))
        tensors_out = [x for x in out if isinstance(x, torch.Tensor)]
        count = iter(range(len(tensors_out)))
        traced["slots"] = [next(count) if isinstance(x, torch.Tensor) else (x,) for x in out]
        return tuple(tensors_out)

    # (Warnings the step raises were shown by its check on fake tensors already.)
    with _compiling_state_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = make_fx(flat, tracing_mode="fake")(*inputs)
        except Exception as e:
            raise NotCompilable(f"make_fx could not trace it ({_first_line(e)})") from e
        finally:
            probes.join()
    if shape_env is not None:
        _check_batch_size_free(shape_env, traced["slots"])
    captured = _inline_constants(gm)
    if captured:
        raise NotCompilable(f"it captures tensors that are not its inputs ({', '.join(captured[:3])}): "
                            "their values would be compiled into the library")  # fmt: skip
    metadata = _dump_outputs(traced["spec"], traced["slots"], spec, dynamic)
    signature = [sig for sig, x in zip(_signature(leaves, dynamic), leaves) if isinstance(x, torch.Tensor)]
    graph = hashlib.blake2b(repr((salt, options, gm.code, signature)).encode(), digest_size=20).hexdigest()
    data = _compiled_before(graphs / f"{graph}.so")
    if data is None:
        data = _compile(gm, inputs, options or {}, scratch=graphs)
        write_atomically(graphs / f"{graph}.so", data)
    write_atomically(so_path, data)
    metadata = hashlib.blake2b(data, digest_size=32).digest() + metadata
    return load(so_path, metadata, args), metadata


def batch_leaves(args: tuple) -> tuple[int, ...]:
    """The flat leaves of ``args = (state, batch, ...)`` a library could take any batch size of.

    The tensors of ``args[1]`` whose first dim is the batch's (that of its first tensor, 2 or
    more) and that are contiguous (so their strides do not depend on it); ``()`` for none.
    """
    if len(args) < 2:
        return ()
    before = len(tree.traced_leaves(args[0]))
    batch = [(before + i, x) for i, x in enumerate(tree.traced_leaves(args[1])) if isinstance(x, torch.Tensor)]
    if not batch or batch[0][1].dim() == 0 or batch[0][1].shape[0] < 2:
        return ()
    size = batch[0][1].shape[0]
    return tuple(i for i, x in batch if x.dim() > 0 and x.shape[0] == size and x.is_contiguous())


def _symbolic(leaves: list, where: list[int], dynamic: tuple[int, ...]) -> tuple[list, Any]:
    """Fake tensors for the tensor leaves, the first dim of the ``dynamic`` ones a symbol; and their shape env."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)

    def fake(i: int) -> torch.Tensor:
        x = leaves[i]
        dims = [DimDynamic.DYNAMIC if i in dynamic and d == 0 else DimDynamic.STATIC for d in range(x.dim())]
        return mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    return [fake(i) for i in where], shape_env


def _check_batch_size_free(shape_env: Any, slots: list) -> None:
    """Refuse a trace that assumed more of the batch size than that it is one size (2 or more)."""
    import sympy
    from torch.utils._sympy.numbers import int_oo

    for guard in shape_env.guards:
        expr = guard.expr
        if not (isinstance(expr, sympy.Eq) and all(isinstance(a, sympy.Symbol) for a in expr.args)):
            raise NotCompilable(f"its trace depends on the batch size ({expr})")
    asserts = [a.expr for found in shape_env.deferred_runtime_asserts.values() for a in found]
    if asserts:
        raise NotCompilable(f"its trace checks the batch size ({asserts[0]})")
    for symbol, value in shape_env.replacements.items():
        if not isinstance(value, sympy.Symbol):
            raise NotCompilable(f"its trace fixes the batch size ({symbol} = {value})")
    for symbol, bounds in shape_env.var_to_range.items():
        if bounds.lower > 2 or bounds.upper != int_oo:
            raise NotCompilable(f"its trace bounds the batch size ({symbol} in {bounds})")
    if any(type(s) is tuple and isinstance(s[0], torch.SymInt | torch.SymFloat | torch.SymBool) for s in slots):
        raise NotCompilable("it returns a number computed from the batch size")


def _probe_vector_isas() -> None:
    """Inductor's check of the CPU's vector instruction sets (in a fresh process and cache: ~1.5 s of test builds)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    with contextlib.suppress(Exception):  # (inductor probes again, and says what failed)
        valid_vec_isa_list()  # (cached for the process)


def _inline_constants(gm: torch.fx.GraphModule) -> list[str]:
    """Turn the tensors the step made from Python numbers and filled with one value
    (``torch.tensor(0.5)``, ``torch.tensor([])``, traced as a copy of a constant) into ``full`` in
    the graph; the names of the tensor constants left.

    Their values come from the step's code and attributes, which the key covers (transformers
    makes several: attention scales, empty caches). AOTInductor cannot take them as constants.
    """
    lift = torch.ops.aten.lift_fresh_copy.default
    left = []
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        value, users = getattr(gm, node.target), list(node.users)
        fill = _fill_of(value) if users and all(use.target is lift for use in users) else None
        if fill is None:
            left.append(node.target)
            continue
        for use in users:
            with gm.graph.inserting_before(use):
                full = gm.graph.call_function(
                    torch.ops.aten.full.default,
                    (list(value.shape), fill),
                    {"dtype": value.dtype, "device": value.device},
                )
            full.meta = dict(use.meta)
            use.replace_all_uses_with(full)
            gm.graph.erase_node(use)
        gm.graph.erase_node(node)
        delattr(gm, node.target)
    gm.recompile()
    return left


def _fill_of(value: Any) -> int | float | bool | None:
    """The one value every element of ``value`` holds (0 for an empty tensor), else ``None``."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return None
    if value.numel() == 0:
        return 0
    first = value.reshape(-1)[0]
    return first.item() if value.numel() == 1 or torch.equal(value, first.expand(value.shape)) else None


def _compiled_before(path: Path) -> bytes | None:
    """The library compiled from the same graph, if there is a loadable one."""
    try:
        data = path.read_bytes()
        torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)  # (a damaged one: compiled again)
    except Exception:
        return None
    return data


def _compile(gm: torch.fx.GraphModule, tensors: list, options: dict, scratch: Path) -> bytes:
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".build-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Path(tmp) / "step.so"
        # (A fresh metadata dict: AOTInductor fills in the one it is given, by default the config's own.)
        options = {**options, "aot_inductor.output_path": str(out), "aot_inductor.metadata": {}}
        try:
            with _wrapper_beside_kernels():
                torch._inductor.aot_compile(gm, tuple(tensors), options=options)
        except Exception as e:
            raise NotCompilable(f"AOTInductor failed ({_first_line(e)})") from e
        if _needs_proxy_executor(Path(tmp)):
            raise NotCompilable("it calls ops the C++ runner can only reach through Python (no C shim)")
        return out.read_bytes()


@contextlib.contextmanager
def _wrapper_beside_kernels() -> Iterator[None]:
    """Compile the library's C++ wrapper and its kernels at once, not one after the other.

    AOTInductor builds the wrapper's object file (the larger: ~7 s for a small step), then the
    kernels' (~3 s), then links. Here this thread's first object build runs in the background
    while the second runs, and the second returns only when both are done: the link, and all
    inductor does between the builds, see what the sequential builds would have left.
    """
    from torch._inductor.cpp_builder import CppBuilder

    build, me, builds = CppBuilder.build, threading.get_ident(), itertools.count()
    wrapper: list[_Background] = []  # the first object build, while it runs

    def overlapped(self: CppBuilder) -> None:
        if threading.get_ident() != me:
            return build(self)
        if not self.get_target_file_path().endswith(".o"):  # (a link: the objects must be there)
            if wrapper:
                wrapper.pop().join()
            return build(self)
        n = next(builds)
        if n == 0:  # (the wrapper: started, and this returns at once)
            wrapper.append(_Background(build, self))
            return None
        try:
            return build(self)
        finally:
            if n == 1:
                wrapper.pop().join()

    CppBuilder.build = overlapped
    try:
        yield
    finally:
        CppBuilder.build = build
        if wrapper:
            wrapper.pop().join()  # (a wrapper no second build joined)


class _Background(threading.Thread):
    """``fn(*args)`` in a thread; :meth:`join` waits and raises what it raised."""

    def __init__(self, fn: Callable, *args: Any):
        super().__init__(daemon=True)
        self._call, self._error = (fn, args), None
        self.start()

    def run(self) -> None:
        fn, args = self._call
        try:
            fn(*args)
        except BaseException as e:
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load(so_path: Path, metadata: bytes, args: tuple) -> Library:
    """The library at ``so_path``, for inputs like ``args``; raises ``ValueError`` when it or ``metadata`` is corrupt."""
    digest, rest = metadata[:32], metadata[32:]
    if hashlib.blake2b(so_path.read_bytes(), digest_size=32).digest() != digest:
        raise ValueError(f"{so_path} does not match its checksum: truncated or replaced")
    leaves, spec = tree.traced_flatten(args)
    out_spec, out_slots, dynamic = _load_outputs(rest, spec)
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so_path), 1)
    return Library(runner, leaves, spec, out_spec, out_slots, dynamic)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _needs_proxy_executor(build_dir: Path) -> bool:
    # The wrapper lists the ops it must call through torch's proxy executor in a JSON beside it.
    import json

    for f in build_dir.rglob("*.json"):
        try:
            nodes = json.loads(f.read_text()).get("nodes")
        except (OSError, ValueError, AttributeError):
            continue
        if nodes:
            return True
    return False


# -- The output structure: pickled, with the objects it shares with the inputs' structure by reference.
# (A TrainState's static fields, the model and the optimizer, are neither picklable nor stale: the
# inputs of every later call hold the same ones, in the same places.)


def _objects(spec: Any) -> list:
    """The non-plain objects in ``spec``'s node contexts, in a fixed walk order."""
    found: list = []

    def walk(x: Any) -> None:
        if isinstance(x, _PLAIN):
            return
        if type(x) in (tuple, list):
            for item in x:
                walk(item)
        elif type(x) is dict:
            for k, v in x.items():
                walk(k)
                walk(v)
        else:
            found.append(x)

    def visit(node: Any) -> None:
        walk(node.context)
        for child in node.children():
            visit(child)

    visit(spec)
    return found


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, known: dict[int, int]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.known = known

    def persistent_id(self, obj: Any) -> int | None:
        return None if isinstance(obj, _PLAIN) else self.known.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, objects: list):
        super().__init__(file)
        self.objects = objects

    def persistent_load(self, pid: int) -> Any:
        return self.objects[pid]


_LEAF = tree.traced_flatten(0)[1]
_NODE = type(tree.traced_flatten((0,))[1])  # (torch's TreeSpec)


def _nested(spec: Any) -> tuple | None:
    """``spec`` as plain tuples (TreeSpec objects themselves pickle through a deprecated path)."""
    return None if spec.is_leaf() else (spec.type, spec.context, [_nested(c) for c in spec.children()])


def _treespec(nested: tuple | None) -> Any:
    if nested is None:
        return _LEAF
    kind, context, children = nested
    return _NODE(kind, context, [_treespec(c) for c in children])


def _dump_outputs(out_spec: Any, slots: list, in_spec: Any, dynamic: tuple[int, ...]) -> bytes:
    f = io.BytesIO()
    try:
        _Pickler(f, {id(obj): i for i, obj in enumerate(_objects(in_spec))}).dump((_nested(out_spec), slots, dynamic))
    except Exception as e:
        raise NotCompilable(f"its output structure cannot be saved ({type(e).__name__}: {e})") from e
    return f.getvalue()


def _load_outputs(data: bytes, in_spec: Any) -> tuple[Any, list, tuple[int, ...]]:
    try:
        nested, slots, dynamic = _Unpickler(io.BytesIO(data), _objects(in_spec)).load()
        return _treespec(nested), slots, dynamic
    except Exception as e:
        raise ValueError(f"its output structure could not be read ({type(e).__name__}: {e})") from e
