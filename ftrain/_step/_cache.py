"""A persistent cache of compiled steps: the second process serves its step from disk.

``torch.compile(fn, fullgraph=True).aot_compile(...)`` captures a whole step ahead of time;
its result can be saved and loaded in another process without dynamo tracing again. Two things
make that safe, and they are this module's job:

* **The key.** A loaded function keeps no guards on globals or object identity, so nothing in
  torch notices when the code, a captured constant or the model changed. ftrain computes its
  own key from everything the graph was traced from (see :func:`step_key_of`); what cannot be
  fingerprinted is not cached (the reason goes to ``logging.DEBUG``).
* **The store.** Artifacts are written atomically (temp file + ``os.replace``) under a per-key
  lock, each with a checksum, so concurrent processes never read a torn file; a corrupt,
  truncated or unloadable artifact is compiled afresh and replaced, with one warning. The C++
  kernels a saved function loads live in inductor's cache directory, so ftrain's compiles point
  it below the same root.

The directory is ``$FTRAIN_CACHE_DIR``, by default ``$XDG_CACHE_HOME/ftrain`` (``~/.cache/ftrain``).
Deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import tree
from .._module import ModuleApply
from . import _aoti

__all__ = ["CachedCompile", "Unfingerprintable", "cache_dir", "fingerprint", "step_key_of"]

log = logging.getLogger(__name__)

# Bumped whenever the key or the file layout changes meaning: old entries then simply miss.
FORMAT = 3
_MAGIC = b"ftrain-step\n"
_LOCK_TIMEOUT_S = 600.0  # a compile that takes longer than this is not waited for

MSG_CORRUPT = (
    "ftrain: the cached compiled step {path} could not be used ({reason}); compiling it afresh and "
    "replacing it. Deleting {root} clears the whole cache."
)


def cache_dir() -> Path:
    """Where compiled steps persist: ``$FTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ftrain`` or ``~/.cache/ftrain``.

    >>> import os
    >>> os.environ["FTRAIN_CACHE_DIR"] = "/somewhere/ftrain"
    >>> str(cache_dir())
    '/somewhere/ftrain'
    >>> del os.environ["FTRAIN_CACHE_DIR"]
    """
    explicit = os.environ.get("FTRAIN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home).absolute() / "ftrain"


# ----------------------------------------------------------------------------------------------
# Fingerprints: a hash of everything a traced graph can depend on.


class Unfingerprintable(TypeError):
    """Something a step depends on has no stable fingerprint, so the step is not cached."""


def _roots(*names: str) -> tuple[str, ...]:
    paths = {sysconfig.get_paths().get(n) for n in names}
    return tuple(sorted(os.path.join(os.path.realpath(p), "") for p in paths if p))


_STDLIB = _roots("stdlib", "platstdlib")
_SITE = _roots("purelib", "platlib")
_FTRAIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Origin:
    """Who owns a module's code: ``"user"`` (fingerprint the code itself) or a versioned package token."""

    _memo: dict[str, str] = {}

    @classmethod
    def of(cls, module_name: str | None) -> str:
        name = module_name or "<unknown>"
        origin = cls._memo.get(name)
        if origin is None:
            origin = cls._memo[name] = cls._find(name)
        return origin

    @classmethod
    def _find(cls, name: str) -> str:
        top = name.partition(".")[0]
        if top == "ftrain":
            return f"ftrain:{_ftrain_source_hash()}"
        if top in sys.builtin_module_names or top in sys.stdlib_module_names:
            return "stdlib"
        module = sys.modules.get(name) or sys.modules.get(top)
        path = getattr(module, "__file__", None)
        if path is None:
            return "user" if name == "__main__" else f"builtin:{top}"
        path = os.path.realpath(path)
        if path.startswith(_STDLIB) and not path.startswith(_SITE):
            return "stdlib"
        if "site-packages" in path.split(os.sep) or "dist-packages" in path.split(os.sep) or path.startswith(_SITE):
            return f"package:{top}=={_version_of(top)}"
        return "user"


def _version_of(top: str) -> str:
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):  # (cheaper than reading the package's metadata)
        return version
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(top)
    for dist in importlib.metadata.packages_distributions().get(top, []):
        return f"{dist}=={importlib.metadata.version(dist)}"
    raise Unfingerprintable(f"the installed package {top!r} has no version to key its code by")


@functools.cache
def _ftrain_source_hash() -> str:
    # ftrain's own code by content, not by version: an editable install changes without a release.
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(_FTRAIN_DIR).rglob("*.py")):
        h.update(str(path.relative_to(_FTRAIN_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


_ATOMS = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), type(NotImplemented))
_BY_REPR = (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size, range, slice)
# Attributes a class or module carries that never change what is traced.
_SKIP_CLASS_ATTRS = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__",
                               "__slots__", "__parameters__", "__orig_bases__", "__firstlineno__", "__static_attributes__",
                               "__dataclass_fields__", "__dataclass_params__", "__match_args__", "_abc_impl"})  # fmt: skip
# Instance attributes that differ from process to process and change nothing a step traces:
# transformers' GenerationConfig keeps the str hash of its own fields (salted per process).
_PER_PROCESS_ATTRS = {"transformers.generation.configuration_utils.GenerationConfig": ("_original_object_hash",)}
_MAX_NODES = 200_000
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined by a class statement (or type())


class _Hasher:
    """Walks an object graph and feeds a canonical description of it into one hash.

    User code is described by its bytecode, constants, defaults, closure cells and the values
    of the globals it names, recursively; code from an installed package by the package's
    name and version; tensors by their metadata (a step reads their values at run time).
    """

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=20)
        self._seen: dict[int, int] = {}
        self._keep: list[Any] = []  # (ids stay unique while the walk holds the objects)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def _put(self, *parts: object) -> None:
        for part in parts:
            self._h.update(str(part).encode())
            self._h.update(b"\x00")

    def add(self, obj: Any) -> None:
        if isinstance(obj, _ATOMS):
            return self._put(type(obj).__name__, repr(obj))
        if isinstance(obj, _BY_REPR):
            return self._put(type(obj).__name__, repr(obj))
        ref = self._seen.get(id(obj))
        if ref is not None:  # shared or cyclic: a back reference
            return self._put("ref", ref)
        if len(self._seen) > _MAX_NODES:
            raise Unfingerprintable(f"the objects the step depends on have more than {_MAX_NODES} parts")
        self._seen[id(obj)] = len(self._seen)
        self._keep.append(obj)
        self._dispatch(obj)

    def _dispatch(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, (list, tuple)):
            self._put(_qualname(type(obj)), len(obj))
            if type(obj) not in (list, tuple):
                self._class(type(obj))  # a NamedTuple: its type matters too
            for item in obj:
                self.add(item)
            return
        if isinstance(obj, dict):
            self._put(_qualname(type(obj)), len(obj))
            for k, v in obj.items():  # in order: the order of a dict of params is the graph's input order
                self.add(k)
                self.add(v)
            return
        if isinstance(obj, (set, frozenset)):
            parts = sorted(fingerprint(item) for item in obj)
            return self._put(type(obj).__name__, *parts)
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, types.MethodType):
            self._put("method")
            self.add(obj.__func__)
            return self.add(obj.__self__)
        if isinstance(obj, type):
            return self._class(obj)
        if isinstance(obj, types.ModuleType):
            return self._put("module", obj.__name__, _Origin.of(obj.__name__))
        if isinstance(obj, types.CodeType):
            return self._code(obj)
        if isinstance(obj, (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodWrapperType,
                            types.MethodDescriptorType, types.ClassMethodDescriptorType, types.GetSetDescriptorType,
                            types.MemberDescriptorType)):  # fmt: skip
            module = getattr(obj, "__module__", None) or getattr(getattr(obj, "__objclass__", None), "__module__", None)
            self._put("builtin", module, getattr(obj, "__qualname__", repr(obj)), _Origin.of(module))
            if isinstance(getattr(obj, "__self__", None), (types.ModuleType, type(None))):
                return
            return self.add(obj.__self__)  # a bound builtin method: its object matters
        if isinstance(obj, (staticmethod, classmethod)):
            self._put(type(obj).__name__)
            return self.add(obj.__func__)
        if isinstance(obj, property):
            self._put("property")
            for part in (obj.fget, obj.fset, obj.fdel):
                self.add(part)
            return
        if isinstance(obj, logging.Logger):  # (holds locks and handlers; only its level changes behaviour)
            return self._put("logger", obj.name, obj.level)
        if isinstance(obj, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return self._put("op", str(obj))
        if isinstance(obj, ModuleApply):
            # Its module and frozen names, not the memos its eager calls fill in (tensor slots, whether
            # it draws): a traced call reads neither, and a first eager run must not change the key.
            self._put("ModuleApply")
            return self.add((obj.module, obj.frozen))
        if isinstance(obj, functools.partial):
            self._put("partial")
            return self.add((obj.func, obj.args, obj.keywords))
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray):
            # (traced as a constant: its values are part of the graph)
            return self._put(
                "ndarray", obj.dtype, obj.shape, hashlib.blake2b(obj.tobytes(), digest_size=16).hexdigest()
            )
        if np is not None and isinstance(obj, np.generic):
            return self._put("numpy", type(obj).__name__, repr(obj))
        if type(obj).__module__.startswith("torch.distributed"):
            # (Its collectives bind process groups by name at trace time, per launch.)
            raise Unfingerprintable(f"a step over a {type(obj).__name__} (a device mesh) is not cached")
        return self._instance(obj)

    def _tensor(self, t: torch.Tensor) -> None:
        self._put(
            "tensor",
            _qualname(type(t)),
            t.dtype,
            t.device,
            t.layout,
            t.requires_grad,
            isinstance(t, torch.nn.Parameter),
        )
        if t.layout == torch.strided:
            self._put(tuple(t.shape), t.stride(), t.storage_offset() if t.device.type != "meta" else 0)
        else:
            self._put(tuple(t.shape))
        spec = getattr(t, "_spec", None)  # a DTensor: its placements and mesh shape the graph
        if spec is not None:
            self._put("dtensor", spec.placements, spec.mesh.shape, spec.mesh.mesh_dim_names, spec.mesh.device_type)

    def _code(self, code: types.CodeType) -> None:
        # Not the file name or line numbers: moving code must not invalidate it.
        self._put("code", code.co_qualname if hasattr(code, "co_qualname") else code.co_name, code.co_argcount,
                  code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_names,
                  code.co_varnames, code.co_freevars, code.co_cellvars)  # fmt: skip
        self._h.update(code.co_code)
        for const in code.co_consts:
            self.add(const)

    def _function(self, fn: types.FunctionType) -> None:
        origin = _Origin.of(fn.__module__)
        self._put("function", fn.__module__, fn.__qualname__, origin)
        if origin == "user":
            self._code(fn.__code__)
            self._globals(fn.__globals__, _names(fn.__code__))
        # Closure cells, defaults and attributes hold runtime values, even in package code.
        self.add(fn.__defaults__)
        self.add(fn.__kwdefaults__)
        cells = fn.__closure__ or ()
        for name, cell in zip(fn.__code__.co_freevars, cells):
            self._put("cell", name)
            try:
                self.add(cell.cell_contents)
            except ValueError:  # an empty cell (a name bound later)
                self._put("empty")
        if fn.__dict__:
            self.add(dict(fn.__dict__))

    def _globals(self, scope: dict, names: set[str]) -> None:
        for name in sorted(names):
            if name not in scope:
                continue
            value = scope[name]
            self._put("global", name)
            if isinstance(value, types.ModuleType) and _Origin.of(value.__name__) == "user":
                # A user module: the attributes this code could read from it (config.LR, helpers.f).
                self._put("module", value.__name__)
                self._globals(vars(value), names)
            else:
                self.add(value)

    def _class(self, cls: type) -> None:
        origin = _Origin.of(cls.__module__)
        self._put("class", cls.__module__, cls.__qualname__, origin)
        if origin != "user":
            return
        for base in cls.__mro__:
            if base is object or _Origin.of(base.__module__) != "user":
                self._put("base", _qualname(base))
                continue
            for name, value in vars(base).items():
                if name not in _SKIP_CLASS_ATTRS:
                    self._put("attr", name)
                    self.add(value)

    def _instance(self, obj: Any) -> None:
        cls = type(obj)
        if cls is object:  # a sentinel: nothing but its identity
            return self._put("object")
        if not cls.__flags__ & _HEAP_TYPE and cls is not types.SimpleNamespace:
            # A type defined in C keeps its state out of reach (only what __dict__ holds is visible).
            raise Unfingerprintable(f"a {_qualname(cls)} object: its state is not visible to Python")
        self._class(cls)
        state = getattr(obj, "__dict__", None)
        slots = [s for c in cls.__mro__ for s in getattr(c, "__slots__", ()) if s not in ("__dict__", "__weakref__")]
        if state is None and not slots:
            if isinstance(obj, (int, float, str, bytes)):  # a subclass of an atom (an IntEnum member)
                return self._put(repr(obj))
            raise Unfingerprintable(f"a {_qualname(cls)} object has no attributes to fingerprint it by")
        if isinstance(state, dict):
            skip = [name for c in cls.__mro__ for name in _PER_PROCESS_ATTRS.get(_qualname(c), ())]
            self.add({k: v for k, v in state.items() if k not in skip} if skip else state)
        for name in slots:
            self._put("slot", name)
            self.add(getattr(obj, name, "<unset>"))


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint(*objs: Any) -> str:
    """A hex digest of everything ``objs`` are made of that a traced graph could depend on.

    Equal for equal programs (in any process); different when code, a captured constant, a
    module's structure or a tensor's metadata differs. Raises :class:`Unfingerprintable`.

    >>> import torch
    >>> fingerprint(torch.zeros(2)) == fingerprint(torch.ones(2))   # values are inputs, not graph
    True
    >>> fingerprint(torch.zeros(2)) == fingerprint(torch.zeros(3))
    False
    """
    h = _Hasher()
    for obj in objs:
        h.add(obj)
    return h.hexdigest()


def _cpu_features() -> tuple:
    """The CPU's vector instruction sets, as inductor sees them (AVX512 with or without BF16, VNNI, AMX)."""
    checks = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported", "_is_amx_tile_supported",
              "_is_amx_fp16_supported", "_is_avx2_supported")  # fmt: skip
    flags = tuple(name for name in checks if getattr(torch.cpu, name, lambda: False)())
    return (torch.backends.cpu.get_cpu_capability(), *flags)


def _environment() -> tuple:
    """What the process contributes to a graph: versions, the machine, and global settings."""
    return (_ftrain_source_hash(), *_compiler_environment())


def _compiler_environment() -> tuple:
    """What a compiler's output depends on besides the graph it is given."""
    # (Inductor's CPU kernels specialize on the thread count.)
    devices = ["cpu", _cpu_features(), torch.get_num_threads()]
    if torch.cuda.is_available():
        devices += [
            (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())
        ]
    return (
        FORMAT,
        sys.implementation.cache_tag,  # saved bytecode is per Python version
        torch.__version__,
        devices,
        torch.get_default_dtype(),
        torch.get_float32_matmul_precision(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_grad_enabled(),
        _compiler_settings(),
        # Global module hooks run inside every forward.
        torch.nn.modules.module._global_forward_hooks,
        torch.nn.modules.module._global_forward_pre_hooks,
    )


_COMPILER_CONFIGS = ("torch._dynamo.config", "torch._inductor.config")
_COMPILER_ENV = ("TORCHDYNAMO_", "TORCHINDUCTOR_", "TORCH_COMPILE_", "TORCH_INDUCTOR_", "INDUCTOR_")


def _compiler_settings() -> tuple:
    """Dynamo's and inductor's settings that differ from their defaults, and the environment variables that set them.

    Not the whole configs: reading them imports the compiler (~1.3 s), which a step served from
    the cache never needs, and a process that has not imported it has every setting at its
    default. (Not their get_hash(): it reprs sets, whose order changes from process to process.)
    """
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_COMPILER_ENV) and not k.endswith("CACHE_DIR"))
    changed = {}
    for name in _COMPILER_CONFIGS:
        config = sys.modules.get(name)
        if config is None:
            continue
        values = config.get_config_copy()
        entries = getattr(config, "_config", None)
        if isinstance(entries, dict):  # (else, another torch: all of it)
            values = {k: v for k, v in values.items() if k not in entries or v != entries[k].default}
        if name.endswith("_dynamo.config"):
            values = _dynamo_settings(values)
        else:
            values.pop("deterministic", None)  # (follows torch's flag while ftrain compiles; the key has that)
        if values:  # (imported and at its defaults is the same as not imported)
            changed[name] = values
    return env, changed


def _dynamo_settings(config: dict) -> dict:
    """Dynamo's config without the ``logging.Logger`` methods its graphs skip.

    ftrain's compiles skip every level method the Logger class has (see ``_dynamo.py``), and
    which ones it has depends on the libraries imported, not on the step: transformers adds
    ``warning_once``. A step that calls one imports its library, whose version the key holds.
    """
    ignored = config.get("ignore_logging_functions")
    if isinstance(ignored, (set, frozenset)):
        config["ignore_logging_functions"] = {f for f in ignored if not _is_logger_method(f)}
    return config


def _is_logger_method(fn: Any) -> bool:
    name = getattr(fn, "__name__", None)
    return isinstance(name, str) and vars(logging.Logger).get(name) is fn


def step_key_of(fn: Callable, args: tuple, options: dict) -> str:
    """The cache key of ``fn`` compiled with ``options`` for ``args``; raises :class:`Unfingerprintable`.

    It covers torch, Python and ftrain (by ftrain's source), the CPU's instruction set and the
    GPUs, global settings that change a trace (default dtype, matmul precision, determinism,
    dynamo's and inductor's configs), ``fn``'s code and everything it reaches (closures,
    referenced globals, recursively through user code; installed packages by version), and the
    inputs: their tree structure, static fields (the model's structure and attributes, the
    optimizer's closures), tensor shapes, strides, dtypes and devices.
    """
    return fingerprint(_environment(), options, fn, args)


# ----------------------------------------------------------------------------------------------
# The store: one file per key, written atomically, read only when whole.


class _Store:
    def __init__(self, root: Path):
        self.root = root
        self.steps = root / "steps"
        self.inductor = root / "inductor"

    def path(self, key: str, suffix: str = ".pt2") -> Path:
        return self.steps / key[:2] / f"{key}{suffix}"

    def read(self, key: str, suffix: str = ".pt2") -> bytes | None:
        """The payload stored under ``key``, ``None`` when absent; raises ValueError when torn or corrupt."""
        try:
            data = self.path(key, suffix).read_bytes()
        except FileNotFoundError:
            return None
        head = len(_MAGIC) + 32 + 32
        if len(data) < head or not data.startswith(_MAGIC):
            raise ValueError("not an ftrain cache file, or truncated")
        stored_key = data[len(_MAGIC) : len(_MAGIC) + 32].decode(errors="replace")
        digest, payload = data[len(_MAGIC) + 32 : head], data[head:]
        if not key.startswith(stored_key):
            raise ValueError("it was written for another key")
        if hashlib.blake2b(payload, digest_size=32).digest() != digest:
            raise ValueError("its checksum does not match: truncated or corrupt")
        return payload

    def write(self, key: str, payload: bytes, suffix: str = ".pt2") -> None:
        path = self.path(key, suffix)
        digest = hashlib.blake2b(payload, digest_size=32).digest()
        _aoti.write_atomically(path, _MAGIC + key[:32].encode() + digest + payload)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held while one process compiles ``key``: the others wait, then load what it saved."""
        try:
            import fcntl
        except ImportError:  # (no flock: writes stay atomic, two processes may both compile)
            yield
            return
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a+b") as f:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.debug("ftrain cache: lock %s held for over %ss; compiling without it", key, _LOCK_TIMEOUT_S)
                        yield
                        return
                    time.sleep(0.05)
            try:
                yield
            finally:  # (the OS releases it too if this process dies)
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def inductor_dir(self) -> Iterator[None]:
        """Point inductor's cache at ours while ftrain compiles or loads: the kernels must persist with the step."""
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        with temporary_cache_dir(str(self.inductor)), self._recorded_isa_probes():
            yield

    @contextlib.contextmanager
    def _recorded_isa_probes(self) -> Iterator[None]:
        """Answer inductor's CPU vector-ISA probes from what an earlier process on this machine found.

        On its first use in a process inductor checks each ISA the CPU reports by building a
        test library and loading it in a child Python (about a second in all, on every warm
        start). The answers depend only on the machine, torch and the compiler, which key the
        record; an unrecorded probe runs as usual and is added.
        """
        try:
            from torch._inductor import config as inductor_config
            from torch._inductor.cpu_vec_isa import VecISA
        except ImportError:
            yield
            return
        probe = VecISA.__dict__.get("check_build")
        if not callable(probe):  # (another torch: probe as it does)
            yield
            return
        cxx = inductor_config.cpp.cxx
        compilers = [shutil.which(c) for c in (cxx if isinstance(cxx, (list, tuple)) else [cxx]) if c]
        compilers = [(c, os.stat(c).st_mtime) for c in compilers if c]  # (a compiler upgrade is a new record)
        machine = fingerprint(torch.__version__, _cpu_features(), compilers, os.environ.get("CXX"))
        path = self.root / "isa" / f"{machine}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        learned = []

        def check_build(isa: Any, code: str) -> bool:
            key = f"{type(isa).__qualname__} {isa.build_arch_flags()} {hashlib.sha1(code.encode()).hexdigest()}"
            if key not in record:
                quick = _quick_isa_probe(isa) if code == VecISA.__dict__.get("_avx_code") else None
                record[key] = bool(probe(isa, code)) if quick is None else quick
                learned.append(key)
            return record[key]

        VecISA.check_build = check_build
        try:
            yield
        finally:
            VecISA.check_build = probe
            if learned:
                _aoti.write_atomically(path, json.dumps(record, indent=1).encode())


_SLEEF_EXP = {512: "Sleef_expf16_u10", 256: "Sleef_expf8_u10"}  # what vectorized exp() links to, by width


def _quick_isa_probe(isa: Any) -> bool | None:
    """Inductor's main probe of an x86 vector ISA, answered in ~0.05 s instead of ~4 CPU s (``None``: not here).

    That probe builds torch's vectorized ``exp`` with the ISA's flags and loads the library, to
    learn (per its own note) whether the compiler takes the flags and libtorch exports the
    matching Sleef functions. This asks both directly: the compiler builds an empty unit with the
    ISA's flags, and libtorch_cpu is looked up for the Sleef symbol of its width. (The CPU's
    own support was checked before the probe is asked.) On a first run it is three of those
    builds, a third of a small model's cold compile on two cores.
    """
    import ctypes
    import platform
    import subprocess

    width = isa.bit_width()
    if sys.platform != "linux" or platform.machine() != "x86_64" or width not in _SLEEF_EXP:
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        libtorch = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        if not hasattr(libtorch, _SLEEF_EXP[width]):
            return False
        command = [get_cpp_compiler(), *isa.build_arch_flags().split(), "-x", "c++", "-c", "-", "-o", os.devnull]
        built = subprocess.run(command, input="int f() { return 0; }\n", text=True, capture_output=True, timeout=60)
        return built.returncode == 0
    except Exception:  # (anything unexpected: let inductor probe as it does)
        return None


# ----------------------------------------------------------------------------------------------
# The compiled function: served from the store, or compiled ahead of time and saved.


def _closure_data(fn: Callable) -> dict[str, Any]:
    """``fn``'s closure values, which a saved function refers to by name instead of pickling them.

    So a loaded function runs with this process's objects (the user's ``loss_fn``, the model),
    and nothing of them needs to be picklable.
    """
    code = fn.__code__
    return {f"closure:{name}": cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__ or ())}


class _Entry:
    """One loaded or freshly compiled function and the cheap check that it serves given inputs."""

    __slots__ = ("compiled", "run", "_guards", "_locals", "_names")

    def __init__(self, compiled: Any, fn: Callable):
        self.compiled = compiled
        self.run = compiled.fn  # the traced code calling the compiled graph, without a second guard check
        self._guards = compiled._artifacts.guard_manager
        code = fn.__code__
        self._names = code.co_varnames[: code.co_argcount]
        self._locals = {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__ or ())}

    def call(self, args: tuple) -> Any:
        return self.run(*args) if self.serves(args) else _aoti.MISS

    def serves(self, args: tuple) -> bool:
        # The guards torch saved (tensor metadata, global state such as grad mode), checked
        # without the bound-signature dict AOTCompiledFunction.__call__ builds on every call.
        return len(args) == len(self._names) and self._guards.check({**self._locals, **dict(zip(self._names, args))})


def _any_size(args: tuple, dynamic: tuple[int, ...]) -> tuple:
    """``args`` for the key of a library that takes any batch size: its ``dynamic`` leaves cut to 2 rows."""
    if not dynamic:
        return args
    leaves, spec = tree.traced_flatten(args)
    for i in dynamic:
        leaves[i] = leaves[i][:2]
    return tree.traced_unflatten(spec, leaves)


def _shapes(args: tuple) -> list:
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in tree.traced_leaves(args)]


_WARNED: set[str] = set()
_UNBUILDABLE = object()  # (a step the library tier refused: the dynamo tier compiles it)
# Batch shapes served by libraries of their own (an evaluation's validation and test splits and
# a partial last batch) before one dynamic-shape dynamo graph serves every later size.
_SHAPES_PER_LIBRARY = 3
_UNBUILDABLE_MARK = b"unbuildable:"
# No precompiled header: building it costs ~6.5 CPU s on each new machine (it lives in the temp
# dir), more than it saves a first run's builds. The C++ wrapper only calls the kernels: -O0
# builds it ~2 s faster (6.8 s against 8.9 s for the digits step's) and its step is as fast.
_LIBRARY_OPTIONS = {"aot_inductor.precompile_headers": False, "aot_inductor.compile_wrapper_opt_level": "O0"}


class CachedCompile:
    """``fn`` compiled whole, served from the persistent cache when it can be.

    Call it like ``fn``. The first call with new inputs computes the key (:func:`step_key_of`)
    and loads what was saved under it, or compiles and saves it; later calls with inputs of the
    same kind run it directly. ``count`` is the number of compiles done in this process, ``hits``
    the number of functions loaded from disk. Two tiers:

    * **a library** (backend ``"inductor"``, plain CPU tensors, no ``options``): the step traced
      by ``make_fx`` and built by AOTInductor into one ``.so`` (see ``_aoti.py``). Loading it
      needs neither dynamo nor inductor: a warm process runs its first step in milliseconds.
      Each of the first three input shapes gets a library of its own.
    * **a saved dynamo function** (``aot_compile``), for everything else: a step that cannot be
      built into a library (the reason is logged at debug level and remembered in the cache),
      other devices, DTensors, ``aot_eager``, and a further input shape, which compiles once
      more with the dims that differ from the first shape's dynamic and serves every later size
      (as ``torch.compile`` does).

    When ``fn`` cannot be cached (something it depends on has no fingerprint, the backend's
    output cannot be saved, it needs a graph break), it is compiled as plain ``torch.compile``
    would, and the reason is logged at debug level.

    Args:
        fn: a pure function of its positional arguments (a step ``core(state, batch)``).
        backend: a ``torch.compile`` backend name; ``"inductor"`` and ``"aot_eager"`` can be
            saved. Another backend (a callable) is compiled uncached.
        fullgraph: passed to ``torch.compile`` when ``fn`` is compiled uncached; a cached
            function is always one whole graph.
        options: more ``torch.compile`` keyword arguments (``mode``, ``options``); part of the key.
        directory: the cache root (default :func:`cache_dir`, read at the first call).
        scope: a context manager factory entered around the calls that may trace (all but those
            a loaded function serves): the dynamo settings the trace needs, off the hot path.
        any_batch_size: build the library with the batch's first dim as a runtime size, so it
            serves every batch size of 2 or more (eval and predict steps); a trace that depends
            on that size is refused and remembered, and each size gets a library as without it.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        backend: str | Callable = "inductor",
        fullgraph: bool = True,
        options: dict | None = None,
        directory: Path | str | None = None,
        scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        any_batch_size: bool = False,
    ):
        self.fn = fn
        self.scope = scope
        self.any_batch_size = any_batch_size
        self.backend = backend
        self.fullgraph = fullgraph
        self.options = dict(options or {})
        self.count = 0
        self.hits = 0
        self._directory = directory
        self._entries: list[_Entry | _aoti.Library] = []
        self._first_shapes: list | None = None  # the first entry's inputs' shapes (see _dynamic_dims)
        self._last: _Entry | _aoti.Library | None = None
        self._fallback: Callable | None = None
        self._no_library: str | None = None  # why fn cannot be built into a library
        self._no_any_size: str | None = None  # why not into one that takes any batch size

    def __call__(self, *args: Any) -> Any:
        last = self._last
        if last is not None:
            out = last.call(args)
            if out is not _aoti.MISS:
                return out
        entry = None if self._fallback is not None else self._find(args) or self._new_entry(args, compile=True)
        if entry is None:
            with self.scope():
                return self._fallback(*args)
        self._last = entry
        return entry.run(*args)

    def prepare(self, *args: Any) -> bool:
        """Load the function for ``args`` from the cache if it is there: True when calling it will not compile."""
        if self._fallback is not None:
            return False
        return (self._find(args) or self._new_entry(args, compile=False)) is not None

    # -- the slow path: key, load or compile, save --------------------------------------------

    def _find(self, args: tuple) -> _Entry | None:
        return next((entry for entry in self._entries if entry.serves(args)), None)

    def _new_entry(self, args: tuple, *, compile: bool) -> _Entry | _aoti.Library | None:
        dynamic = self._dynamic_dims(args)
        why = self._uncacheable()
        libraries = sum(isinstance(entry, _aoti.Library) for entry in self._entries)
        if why is None and (not dynamic or libraries < _SHAPES_PER_LIBRARY) and self._library_tier(args):
            library = self._new_library(args, compile=compile)
            if library is not _UNBUILDABLE:
                return library
        with self.scope():  # (dynamo's settings, which the key then covers)
            return self._new_dynamo_entry(args, dynamic, why, compile=compile)

    def _new_dynamo_entry(self, args: tuple, dynamic: list, why: str | None, *, compile: bool) -> _Entry | None:
        key = None
        if why is None:
            try:
                key = step_key_of(self.fn, args, {"backend": self.backend, "dynamic": dynamic, **self.options})
            except Unfingerprintable as e:
                why = str(e)
            except Exception as e:  # (an object whose attributes raise when read: not cached either)
                why = f"fingerprinting it raised {type(e).__name__}: {e}"
        if key is None:
            log.debug("ftrain cache: %s is compiled without the cache: %s", _name(self.fn), why)
            self._fallback = self._plain()
            return None
        store = self._store()
        entry = self._load(store, key, args)
        if entry is None and compile:
            with store.lock(key):
                entry = self._load(store, key, args)  # another process may have saved it while we waited
                if entry is None:
                    entry = self._compile_and_save(store, key, args, dynamic)
        if entry is not None:
            self._add(entry, args)
        return entry

    def _dynamic_dims(self, args: tuple) -> list[tuple[int, int]]:
        """``(leaf, dim)`` pairs whose size differs from the first entry's inputs: compiled dynamic."""
        first = self._first_shapes
        if first is None:
            return []
        now = _shapes(args)
        if len(first) != len(now):
            return []
        return [
            (i, d)
            for i, (a, b) in enumerate(zip(first, now))
            if a is not None and b is not None and len(a) == len(b)
            for d in range(len(a))
            if a[d] != b[d]
        ]

    def _add(self, entry: _Entry | _aoti.Library, args: tuple) -> None:
        if not self._entries:
            self._first_shapes = _shapes(args)
        self._entries.append(entry)

    def _store(self) -> _Store:
        return _Store(Path(self._directory) if self._directory is not None else cache_dir())

    def _warn_corrupt(self, store: _Store, key: str, path: Path, error: Exception) -> None:
        if key not in _WARNED:
            _WARNED.add(key)
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            warnings.warn(MSG_CORRUPT.format(path=path, reason=reason, root=store.root), RuntimeWarning, stacklevel=6)

    # -- the library tier ----------------------------------------------------------------------

    def _library_tier(self, args: tuple) -> bool:
        return (
            self._no_library is None
            and self.backend == "inductor"
            and not self.options
            and _aoti.unsupported(tree.traced_leaves(args)) is None
        )

    def _new_library(self, args: tuple, *, compile: bool) -> _aoti.Library | None | object:
        """The library for ``args``: loaded, built (``compile``), ``None`` (not built yet) or ``_UNBUILDABLE``.

        With ``any_batch_size``, first one whose batch size is a runtime size (see ``_aoti.build``).
        """
        dynamic = _aoti.batch_leaves(args) if self.any_batch_size and self._no_any_size is None else ()
        if dynamic:
            library = self._library_for(args, dynamic, compile=compile)
            if library is not _UNBUILDABLE:
                return library
        return self._library_for(args, (), compile=compile)

    def _library_for(self, args: tuple, dynamic: tuple[int, ...], *, compile: bool) -> _aoti.Library | None | object:
        try:
            key = step_key_of(self.fn, _any_size(args, dynamic), {"tier": "library", "any_batch_size": dynamic})
        except Exception:  # (Unfingerprintable, or attributes that raise: the dynamo tier says why)
            return _UNBUILDABLE
        store = self._store()
        library = self._load_library(store, key, args, dynamic)
        if library is None and compile:
            with store.lock(key):
                library = self._load_library(store, key, args, dynamic)  # another process may have built it meanwhile
                if library is None:
                    library = self._build_library(store, key, args, dynamic)
        if isinstance(library, _aoti.Library):
            self._add(library, args)
        return library

    def _refused(self, dynamic: tuple[int, ...], reason: str) -> object:
        if dynamic:
            self._no_any_size = reason  # (a library for each batch size, then)
        else:
            self._no_library = reason
        return _UNBUILDABLE

    def _load_library(
        self, store: _Store, key: str, args: tuple, dynamic: tuple[int, ...]
    ) -> _aoti.Library | None | object:
        path = store.path(key, ".lib")
        try:
            metadata = store.read(key, ".lib")
            if metadata is None:
                return None
            if metadata.startswith(_UNBUILDABLE_MARK):
                return self._refused(dynamic, metadata[len(_UNBUILDABLE_MARK) :].decode(errors="replace"))
            path = store.path(key, ".so")
            library = _aoti.load(path, metadata, args)
        except Exception as e:  # a torn, corrupt or incompatible library is only a miss
            self._warn_corrupt(store, key, path, e)
            return None
        self.hits += 1
        log.debug("ftrain cache: %s served from %s", _name(self.fn), store.path(key, ".so"))
        return library

    def _build_library(self, store: _Store, key: str, args: tuple, dynamic: tuple[int, ...]) -> _aoti.Library | object:
        so = store.path(key, ".so")
        try:
            with self.scope(), store.inductor_dir():
                library, metadata = _aoti.build(
                    self.fn, args, so, graphs=store.inductor / "libraries", salt=fingerprint(_compiler_environment()),
                    options=_LIBRARY_OPTIONS, dynamic=dynamic,
                )  # fmt: skip
        except _aoti.NotCompilable as e:
            # Remembered, so later processes go to the dynamo tier (or a library per size) at once.
            log.debug("ftrain cache: %s is not built into a library%s: %s", _name(self.fn),
                      " for any batch size" if dynamic else "", e)  # fmt: skip
            store.write(key, _UNBUILDABLE_MARK + str(e).encode(), ".lib")
            return self._refused(dynamic, str(e))
        self.count += 1
        store.write(key, metadata, ".lib")
        log.debug("ftrain cache: %s built into %s", _name(self.fn), so)
        return library

    # -- the dynamo tier -------------------------------------------------------------------------

    def _uncacheable(self) -> str | None:
        if not hasattr(torch.compiler, "load_compiled_function"):
            return f"torch {torch.__version__} cannot save compiled functions (torch.compiler.load_compiled_function)"
        if not isinstance(self.fn, types.FunctionType):
            return f"it is a {type(self.fn).__name__}, not a Python function"
        if not isinstance(self.backend, str) or self.backend not in ("inductor", "aot_eager"):
            return f"backend {self.backend!r} cannot be saved (use 'inductor' or 'aot_eager')"
        return None

    def _plain(self) -> Callable:
        counter = _Counter(self)
        backend = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        return torch.compile(self.fn, fullgraph=self.fullgraph, backend=counter.wrap(backend), **self.options)

    def _load(self, store: _Store, key: str, args: tuple) -> _Entry | None:
        path = store.path(key)
        try:
            payload = store.read(key)
            if payload is None:
                return None
            with store.inductor_dir(), torch._guards.tracing(torch._guards.TracingContext(None)):
                # (On torch 2.13 an unpickled import guard asks for a tracing context.)
                compiled = torch.compiler.load_compiled_function(
                    io.BytesIO(payload), f_globals=self.fn.__globals__, external_data=_closure_data(self.fn)
                )
            entry = _Entry(compiled, self.fn)
            if not entry.serves(args):
                raise ValueError("its guards reject these inputs")
        except Exception as e:  # a torn, corrupt or incompatible artifact is only a miss
            self._warn_corrupt(store, key, path, e)
            return None
        self.hits += 1
        log.debug("ftrain cache: %s served from %s", _name(self.fn), path)
        return entry

    def _compile_and_save(self, store: _Store, key: str, args: tuple, dynamic: list) -> _Entry | None:
        # ftrain's key stands for every guard but those on the inputs' tensors and the global
        # state (grad mode, autocast): keep only these, which torch can save and check.
        options = {**self.options, "options": {**self.options.get("options", {}), "guard_filter_fn": _portable_guards}}
        torch_compile = torch.compile(self.fn, fullgraph=True, backend=self.backend, **options)
        with store.inductor_dir(), _marked_dynamic(args, dynamic):
            try:
                compiled = torch_compile.aot_compile((args, {}))
            except Exception as e:
                # aot_compile is stricter than torch.compile (a graph break, a guard it cannot
                # save): compile the usual way; a real error in the step resurfaces there.
                log.debug(
                    "ftrain cache: %s cannot be compiled ahead of time (%s: %s)", _name(self.fn), type(e).__name__, e
                )
                self._fallback = self._plain()
                return None
            self.count += 1
            try:
                payload = type(compiled).serialize(compiled, _closure_data(self.fn)).serialized_data
            except Exception as e:
                log.debug("ftrain cache: %s compiled but not saved (%s: %s)", _name(self.fn), type(e).__name__, e)
            else:
                store.write(key, payload)
                log.debug("ftrain cache: %s saved to %s", _name(self.fn), store.path(key))
        return _Entry(compiled, self.fn)


def _portable_guards(entries: list) -> list[bool]:
    return torch.compiler.keep_portable_guards_unsafe(entries)


@contextlib.contextmanager
def _marked_dynamic(args: tuple, dims: list[tuple[int, int]]) -> Iterator[None]:
    """Mark ``(leaf, dim)`` of ``args`` dynamic for one trace, and unmark them after."""
    leaves = tree.traced_leaves(args)
    marked = [leaves[i] for i, _ in dims if not hasattr(leaves[i], "_dynamo_dynamic_indices")]
    for i, d in dims:
        torch._dynamo.mark_dynamic(leaves[i], d)
    try:
        yield
    finally:
        for t in marked:
            del t._dynamo_dynamic_indices


class _Counter:
    """Counts the graphs a plain ``torch.compile`` compiles, into its :class:`CachedCompile`'s ``count``."""

    def __init__(self, owner: CachedCompile):
        self.owner = owner

    def wrap(self, backend: Callable) -> Callable:
        def counting(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
            self.owner.count += 1
            return backend(gm, example_inputs, **kwargs)

        return counting


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)
