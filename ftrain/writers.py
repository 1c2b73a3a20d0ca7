"""Metric writers: one small protocol, several sinks, and a fan-out.

A writer has four methods: ``write_scalars(step, scalars)``, ``write_hparams(hparams)``,
``flush()`` and ``close()`` (:class:`Writer`). The loop hands them host floats that it
has already synced at a log interval, so writing never touches the device. A writer may
also have ``write_images(step, images)``, ``write_histograms(step, histograms)`` and
``write_text(step, texts)`` (:class:`TensorBoard` does); :class:`MultiWriter` skips the
writers without them.

:class:`MLflow` and :class:`WandB` log into a tracker's run. Such a writer has a ``tracker``
name, a ``run_id`` and ``resume(run_id)``: a checkpoint saves the run ids, and a resumed
:func:`ftrain.fit` continues the same runs (:meth:`MultiWriter.run_ids`, :meth:`MultiWriter.resume_runs`).

Under ``torch.distributed`` only rank 0 writes: every writer here checks the rank on
each call, so the same script runs unchanged under ``torchrun``.

Example:
    >>> import tempfile, pathlib
    >>> from ftrain import writers
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> w = writers.MultiWriter([writers.JSONL(d / "m.jsonl"), writers.CSV(d / "m.csv")])
    >>> w.write_scalars(10, {"train/loss": 0.5})
    >>> w.close()
    >>> (d / "m.jsonl").read_text()
    '{"step": 10, "train/loss": 0.5}\\n'
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import IO, Any, NamedTuple, Protocol, runtime_checkable

import torch

__all__ = [
    "CSV",
    "JSONL",
    "Console",
    "MLflow",
    "MultiWriter",
    "TensorBoard",
    "WandB",
    "Writer",
    "is_rank_zero",
    "to_writer",
]


@runtime_checkable
class Writer(Protocol):
    """What the loop needs from a metrics sink.

    Implement these four methods to send metrics anywhere (a database, a tracker of
    your own); no base class is needed. A writer that logs into a tracker's run may add a
    ``tracker`` class attribute (the key its run id is checkpointed under), a ``run_id``
    property and ``resume(run_id)``, as :class:`MLflow` and :class:`WandB` do.

    Example:
        >>> class Collect:
        ...     def __init__(self): self.rows = []
        ...     def write_scalars(self, step, scalars): self.rows.append((step, dict(scalars)))
        ...     def write_hparams(self, hparams): pass
        ...     def flush(self): pass
        ...     def close(self): pass
        >>> isinstance(Collect(), Writer)
        True
    """

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> float) at ``step``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters / config, once per run."""

    def flush(self) -> None:
        """Push buffered records to their destination."""

    def close(self) -> None:
        """Flush and release files or connections."""


def is_rank_zero() -> bool:
    """True unless running under an initialized ``torch.distributed`` group as a rank other than 0.

    Example:
        >>> is_rank_zero()
        True
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _jsonable(value: Any) -> Any:
    # Hyperparameters may hold anything (a dtype, a schedule); keep numbers and strings as they are.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)


def _flat(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = _jsonable(v)
    return out


def format_scalar(value: float) -> str:
    """A metric value as the console and the progress bar print it: 4 significant digits, or an exponent.

    >>> format_scalar(0.41234), format_scalar(1.5e-5)
    ('0.4123', '1.500e-05')
    """
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


class Console:
    """Print one line per :meth:`write_scalars` call: ``step 100 | train/loss 0.4123 | ...``.

    Lines go through ``tqdm.write`` when tqdm is installed, so they do not tear a progress bar.

    Args:
        stream: where to print (default ``sys.stderr``).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> Console(out).write_scalars(100, {"train/loss": 0.41234})
        >>> out.getvalue()
        'step 100 | train/loss 0.4123\\n'
    """

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Print ``scalars`` on one line."""
        if not is_rank_zero():
            return
        line = " | ".join([f"step {step}", *(f"{k} {format_scalar(v)}" for k, v in scalars.items())])
        self._print(line)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Print the hyperparameters once, as ``key=value`` pairs."""
        if not is_rank_zero():
            return
        self._print("hparams: " + ", ".join(f"{k}={v}" for k, v in _flat(hparams).items()))

    def _print(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:
            print(line, file=stream, flush=True)
        else:
            tqdm.write(line, file=stream)

    def flush(self) -> None:
        """Flush the stream."""
        (self.stream if self.stream is not None else sys.stderr).flush()

    def close(self) -> None:
        """Flush (the stream stays open: it is not ours)."""
        self.flush()


class JSONL:
    """Append one JSON object per :meth:`write_scalars` call to ``path``: ``{"step": 100, "train/loss": 0.41}``.

    The file is opened for each write (every log interval, not every step), so
    nothing is lost if the process dies and there is no handle to leak.
    Hyperparameters are written once as ``{"hparams": {...}}``.

    Args:
        path: the ``.jsonl`` file; its directory is created.

    Example:
        >>> import json, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> JSONL(path).write_scalars(3, {"val/acc": 0.9})
        >>> json.loads(path.read_text())
        {'step': 3, 'val/acc': 0.9}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if is_rank_zero():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def _append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append ``{"step": step, **scalars}``."""
        if is_rank_zero():
            self._append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Append ``{"hparams": {...}}`` (values that JSON cannot hold are written as their repr)."""
        if is_rank_zero():
            self._append({"hparams": _jsonable(dict(hparams))})

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Nothing is held open."""


class CSV:
    """Append rows ``step,name,value`` to ``path`` (long format: new metric names need no new columns).

    Hyperparameters go to ``<path stem>.hparams.json`` beside it.

    Args:
        path: the ``.csv`` file; its directory is created and a header written if it is new.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> CSV(path).write_scalars(5, {"train/loss": 0.25})
        >>> path.read_text().split()
        ['step,name,value', '5,train/loss,0.25']
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if is_rank_zero():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not os.path.exists(self.path):
                with open(self.path, "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerow(["step", "name", "value"])

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append one row per scalar."""
        if not is_rank_zero():
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for name, value in scalars.items():
                w.writerow([int(step), name, repr(float(value))])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write the hyperparameters as JSON beside the CSV file."""
        if is_rank_zero():
            stem = os.path.splitext(self.path)[0]
            with open(stem + ".hparams.json", "w", encoding="utf-8") as f:
                json.dump(_jsonable(dict(hparams)), f, indent=2)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Nothing is held open."""


class Histogram(NamedTuple):
    """A histogram already counted (on the device, then copied once): what ``write_histograms`` takes.

    ``counts[i]`` values fell in ``[edges[i], edges[i + 1])``; ``min``, ``max``, ``num``, ``sum``
    and ``sum_squares`` describe all the values (TensorBoard's raw histogram fields).
    """

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    edges: list[float]
    counts: list[float]


class TensorBoard:
    """Scalars and hyperparameters to a TensorBoard log directory (``torch.utils.tensorboard``).

    Needs the ``tensorboard`` package (``pip install ftrain[tensorboard]``); it is
    imported when the writer is built, not when ftrain is. Call :meth:`close` at
    the end of the run (``fit`` only flushes writers, so one writer can serve
    several ``fit`` calls).

    Args:
        logdir: the run directory (``tensorboard --logdir`` its parent).
        **kwargs: passed to ``SummaryWriter`` (e.g. ``flush_secs``).

    Example:
        >>> import tempfile
        >>> tb = TensorBoard(tempfile.mkdtemp())
        >>> tb.write_scalars(1, {"train/loss": 0.5})
        >>> tb.close()
    """

    def __init__(self, logdir: str | os.PathLike, **kwargs: Any):
        self.logdir = os.fspath(logdir)
        self._writer = None
        if not is_rank_zero():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "writers.TensorBoard needs the tensorboard package: pip install 'ftrain[tensorboard]'"
            ) from e
        self._writer = SummaryWriter(self.logdir, **kwargs)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """``add_scalar`` for each scalar."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters into the same run directory (TensorBoard's HParams tab), plus a text summary."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        flat = {k: (v if isinstance(v, (bool, int, float, str)) else repr(v)) for k, v in _flat(hparams).items()}
        # SummaryWriter.add_hparams writes into a new sub-run; write the three summaries here instead.
        for summary in hparams_summary(flat, {}):
            self._writer.file_writer.add_summary(summary)
        self._writer.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in flat.items()))

    def write_images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """``add_image`` per ``(C, H, W)`` tensor, ``add_images`` per ``(N, C, H, W)`` batch (floats in [0, 1] or uint8)."""
        if self._writer is None:
            return
        for name, image in images.items():
            image = image.detach().cpu()
            if image.dim() == 4:
                self._writer.add_images(name, image, global_step=int(step))
            else:
                self._writer.add_image(name, image, global_step=int(step))

    def write_histograms(self, step: int, histograms: Mapping[str, Histogram | torch.Tensor]) -> None:
        """A :class:`Histogram` (counts already made, e.g. on the device) or a tensor of values per name."""
        if self._writer is None:
            return
        for name, h in histograms.items():
            if isinstance(h, Histogram):
                self._writer.add_histogram_raw(
                    name, h.min, h.max, h.num, h.sum, h.sum_squares, h.edges[1:], h.counts, global_step=int(step)
                )
            else:
                self._writer.add_histogram(name, h.detach().cpu(), global_step=int(step))

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """``add_text`` per name (TensorBoard renders markdown)."""
        if self._writer is None:
            return
        for name, text in texts.items():
            self._writer.add_text(name, text, global_step=int(step))

    def flush(self) -> None:
        """Flush the event file."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _hwc(image: torch.Tensor) -> Any:
    """A ``(C, H, W)`` image as the ``(H, W, C)`` (or ``(H, W)``) numpy array trackers take: floats in [0, 1] or uint8."""
    image = image.detach().cpu()
    if image.is_floating_point():
        image = image.float().clamp(0, 1)
    image = image.permute(1, 2, 0)
    return (image[..., 0] if image.shape[-1] == 1 else image).numpy()


def _images(images: Mapping[str, torch.Tensor]) -> Iterable[tuple[str, list[Any]]]:
    """``(name, [HWC arrays])`` per entry: one for a ``(C, H, W)`` tensor, N for an ``(N, C, H, W)`` batch."""
    for name, image in images.items():
        yield name, [_hwc(i) for i in image] if image.dim() == 4 else [_hwc(image)]


class _TrackerRun:
    """What :class:`MLflow` and :class:`WandB` share: a run, started at the first write, that a checkpoint resumes.

    A writer that logs into a tracker's run has a ``tracker`` name (the key its id is saved
    under), a ``run_id`` and ``resume(run_id)``; :class:`ftrain.actions.Checkpoint` saves the ids
    (``MultiWriter.run_ids``) and ``fit`` hands them back (``MultiWriter.resume_runs``) before
    the first write of a resumed run. A subclass implements ``_start`` (create the run, or
    reopen ``self._run_id``); on rank 0, ``self._package`` is the tracker's package, imported here.
    """

    tracker: str

    def __init__(self, run_id: str | None):
        self._run_id = run_id
        self._active: bool | None = None  # None: not rank 0 (writes nothing); False: not started; True: started
        self._package: Any = None
        if not is_rank_zero():
            return
        try:
            self._package = importlib.import_module(self.tracker)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"writers.{type(self).__name__} needs the {self.tracker} package: pip install 'ftrain[{self.tracker}]'"
            ) from e
        self._active = False

    @property
    def run_id(self) -> str | None:
        """The run's id, starting the run if it has none yet (``None`` on ranks other than 0)."""
        if self._run_id is None:
            self._open()
        return self._run_id

    def resume(self, run_id: str) -> None:
        """Log into the existing run ``run_id`` (``fit`` calls this with the id a checkpoint saved)."""
        if self._active is None or run_id == self._run_id:
            return
        if self._run_id is not None:
            raise ValueError(
                f"writers.{type(self).__name__}: the checkpoint being resumed belongs to {self.tracker} run "
                f"{run_id!r}, but this writer already logs to run {self._run_id!r}; build a new writer (without "
                "run_id=) to continue the checkpoint's run, or resume=False to start a new one"
            )
        self._run_id = run_id

    def _open(self) -> bool:
        """Start the run on its first use; whether this process writes."""
        if self._active is False:
            self._start()
            self._active = True
        return bool(self._active)

    def _start(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"writers.{type(self).__name__}(run_id={self._run_id!r})"


class MLflow(_TrackerRun):
    """Scalars, params, text and images to an MLflow run (``pip install 'ftrain[mlflow]'``).

    It talks to MLflow through ``MlflowClient``, never the global active run, so it leaves
    ``mlflow.start_run`` in your code alone. The run is created (in ``experiment``, made if
    missing) at the first write; with a checkpoint manager, its id is saved with every checkpoint
    and a resumed ``fit`` logs into the same run, the steps continuing. :meth:`close` marks the
    run finished (``fit`` only flushes). Params (``write_hparams``) are strings and cannot change
    in MLflow: on a resumed run new keys are added, and a changed value is kept as it was, with
    a warning naming it. Histograms: MLflow has none, so they are skipped.

    Args:
        experiment: the experiment's name.
        tracking_uri: the tracking server or store (``http://127.0.0.1:5000``,
            ``sqlite:///mlflow.db``); default: MLflow's own (``MLFLOW_TRACKING_URI``).
        run_name: the new run's name.
        run_id: log into this existing run instead of creating one.
        tags: tags of the new run.
    """

    tracker = "mlflow"

    def __init__(
        self,
        experiment: str = "ftrain",
        *,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        super().__init__(run_id)
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self._client = self._package.tracking.MlflowClient(tracking_uri) if self._package is not None else None

    def _start(self) -> None:
        if self._run_id is not None:
            self._client.update_run(self._run_id, status="RUNNING")  # (also checks that the run exists)
            return
        found = self._client.get_experiment_by_name(self.experiment)
        experiment = found.experiment_id if found is not None else self._client.create_experiment(self.experiment)
        self._run_id = self._client.create_run(experiment, run_name=self.run_name, tags=self.tags).info.run_id

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One ``log_batch`` of the scalars at ``step``."""
        if not self._open():
            return
        now = int(time.time() * 1000)
        metrics = [self._package.entities.Metric(k, float(v), now, int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(self._run_id, metrics=metrics[i : i + 1000])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hyperparameters as params, flattened (``optim.lr``); values are their ``str``."""
        if not self._open():
            return
        kept = self._client.get_run(self._run_id).data.params
        flat = {k: str(v) for k, v in _flat(hparams).items()}
        changed = {k: (kept[k], v) for k, v in flat.items() if k in kept and kept[k] != v}
        if changed:
            warnings.warn(
                f"writers.MLflow: run {self._run_id} keeps its params {changed} as first logged (old, new): "
                "MLflow params cannot change",
                RuntimeWarning,
                stacklevel=2,
            )
        params = [self._package.entities.Param(k, v) for k, v in flat.items() if k not in kept]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self._client.log_batch(self._run_id, params=params[i : i + 100])

    def write_images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """``log_image`` per image (``<name>/<i>`` for each image of an ``(N, C, H, W)`` batch)."""
        if not self._open():
            return
        for name, arrays in _images(images):
            for i, array in enumerate(arrays):
                key = name if len(arrays) == 1 else f"{name}/{i}"
                self._client.log_image(self._run_id, array, key=key, step=int(step))

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Each text as the artifact ``<name>/step_<step>.md``."""
        if not self._open():
            return
        for name, text in texts.items():
            self._client.log_text(self._run_id, text, f"{name}/step_{int(step)}.md")

    def flush(self) -> None:
        """Nothing is buffered: every write is one request."""

    def close(self) -> None:
        """Mark the run finished (a later write reopens it)."""
        if self._active:
            self._client.set_terminated(self._run_id)
            self._active = False


class WandB(_TrackerRun):
    """Scalars, config, images, histograms and text to a Weights & Biases run (``pip install 'ftrain[wandb]'``).

    The run is started (``wandb.init``) at the first write; with a checkpoint manager its id is
    saved with every checkpoint and a resumed ``fit`` continues it (``wandb.init(id=...,
    resume="allow")``), the steps continuing. W&B keeps one history per run and drops a step
    below the last one it has: after a crash, the steps between the checkpoint and the crashed
    run's last log line keep the crashed run's values. Offline (``mode="offline"`` or
    ``WANDB_MODE=offline``) each start is a directory ``wandb/offline-run-*-<id>`` that
    ``wandb sync`` uploads into the one run. :meth:`close` finishes the run (``fit`` only flushes).

    Args:
        project: the W&B project.
        run_id: continue this existing run instead of starting a new one.
        **init_kwargs: passed to ``wandb.init`` (``entity=``, ``name=``, ``dir=``, ``mode=``, ``tags=``, ...).
    """

    tracker = "wandb"

    def __init__(self, project: str | None = None, *, run_id: str | None = None, **init_kwargs: Any):
        super().__init__(run_id)
        self.project, self.init_kwargs = project, init_kwargs
        self._run: Any = None

    def _start(self) -> None:
        # reinit: several writers' runs side by side; resume="allow": this id's run if it exists, else a new one
        kwargs = {"reinit": "create_new", "resume": "allow", **self.init_kwargs}
        self._run = self._package.init(project=self.project, id=self._run_id, **kwargs)
        self._run_id = self._run.id

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """``run.log(scalars, step=step)``."""
        if self._open():
            self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hyperparameters into the run's config (a resumed run may change a value)."""
        if self._open():
            self._run.config.update(_jsonable(dict(hparams)), allow_val_change=True)

    def write_images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """A ``wandb.Image`` per ``(C, H, W)`` tensor, a list of them per ``(N, C, H, W)`` batch."""
        if self._open():
            logged = {name: [self._package.Image(a) for a in arrays] for name, arrays in _images(images)}
            self._run.log({k: v if images[k].dim() == 4 else v[0] for k, v in logged.items()}, step=int(step))

    def write_histograms(self, step: int, histograms: Mapping[str, Histogram | torch.Tensor]) -> None:
        """A ``wandb.Histogram`` per name: a :class:`Histogram`'s counts as they are, or a tensor's values."""
        if not self._open():
            return
        logged = {
            name: self._package.Histogram(np_histogram=(h.counts, h.edges))
            if isinstance(h, Histogram)
            else self._package.Histogram(h.detach().cpu().float().numpy())
            for name, h in histograms.items()
        }
        self._run.log(logged, step=int(step))

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Each text as a string in the run's history."""
        if self._open():
            self._run.log(dict(texts), step=int(step))

    def flush(self) -> None:
        """W&B sends in the background; nothing to push."""

    def close(self) -> None:
        """Finish the run (a later write resumes it)."""
        if self._active:
            self._run.finish()
            self._run, self._active = None, False


class MultiWriter:
    """Fan out every call to several writers, in order.

    Args:
        writers: the writers.

    Example:
        >>> import io
        >>> a, b = io.StringIO(), io.StringIO()
        >>> MultiWriter([Console(a), Console(b)]).write_scalars(1, {"x": 1.0})
        >>> a.getvalue() == b.getvalue() == 'step 1 | x 1\\n'
        True
    """

    def __init__(self, writers: Iterable[Writer]):
        self.writers = list(writers)
        for i, w in enumerate(self.writers):
            if not isinstance(w, Writer):
                raise TypeError(
                    f"MultiWriter: writer {i} is a {type(w).__name__}, which lacks "
                    f"{[m for m in ('write_scalars', 'write_hparams', 'flush', 'close') if not hasattr(w, m)]}; "
                    "use ftrain.writers.Console/JSONL/CSV/TensorBoard/MLflow/WandB or implement the Writer protocol"
                )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write to each writer."""
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write to each writer."""
        for w in self.writers:
            w.write_hparams(hparams)

    def write_images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """Write to each writer that has ``write_images`` (the others skip them)."""
        self._optional("write_images", step, images)

    def write_histograms(self, step: int, histograms: Mapping[str, Any]) -> None:
        """Write to each writer that has ``write_histograms`` (the others skip them)."""
        self._optional("write_histograms", step, histograms)

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Write to each writer that has ``write_text`` (the others skip them)."""
        self._optional("write_text", step, texts)

    def _optional(self, method: str, step: int, values: Mapping[str, Any]) -> None:
        for w in self.writers:
            write = getattr(w, method, None)
            if callable(write):
                write(step, values)

    def run_ids(self) -> dict[str, str]:
        """``{tracker: run id}`` of the writers that log into a tracker's run (what a checkpoint saves).

        Example:
            >>> MultiWriter([Console()]).run_ids()
            {}
        """
        ids: dict[str, str] = {}
        for w in self._trackers():
            run_id = w.run_id
            if run_id is None:
                continue  # (not rank 0)
            if ids.get(w.tracker, run_id) != run_id:
                raise ValueError(
                    f"MultiWriter: two {w.tracker} writers log to different runs ({ids[w.tracker]!r}, {run_id!r}); "
                    "a checkpoint keeps one run id per tracker, so keep one of them"
                )
            ids[w.tracker] = run_id
        return ids

    def resume_runs(self, run_ids: Mapping[str, str]) -> None:
        """Tell each tracker writer the run a checkpoint saved (``run_ids`` as :meth:`run_ids` gave it)."""
        for w in self._trackers():
            if w.tracker in run_ids:
                w.resume(run_ids[w.tracker])

    def _trackers(self) -> list[Any]:
        return [w for w in self.writers if isinstance(getattr(w, "tracker", None), str)]

    def flush(self) -> None:
        """Flush each writer."""
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Close each writer."""
        for w in self.writers:
            w.close()


def to_writer(log: Writer | Iterable[Writer] | None) -> MultiWriter:
    """Normalize ``fit``'s ``log=`` argument (``None``, one writer or several) to one :class:`MultiWriter`.

    Example:
        >>> to_writer(None).writers
        []
        >>> len(to_writer([Console(), Console()]).writers)
        2
    """
    if log is None:
        return MultiWriter([])
    if isinstance(log, MultiWriter):
        return log
    if isinstance(log, Writer):
        return MultiWriter([log])
    if isinstance(log, (str, bytes, os.PathLike)) or not isinstance(log, Iterable):
        raise TypeError(
            f"log= expects a writer or a list of writers, got {type(log).__name__} {log!r}; "
            "e.g. log=ftrain.writers.JSONL('runs/exp/metrics.jsonl')"
        )
    return MultiWriter(log)
