"""Optimizers in optax's shape with torch.optim's numbers.

An optimizer is a :class:`GradientTransformation`: a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``.
Named optimizers (:func:`sgd`, :func:`adam`, :func:`adamw`, :func:`rmsprop`, :func:`adagrad`,
:func:`nadam`, :func:`radam`, :func:`lion`) are chains of small building blocks whose float64
results equal the matching ``torch.optim`` class. Hyperparameters can live in the state as
tensors (:func:`inject_hyperparams`), so changing them never recompiles a compiled step.

Example:
    >>> import torch
    >>> from ftrain import optim, schedules
    >>> tx = optim.chain(
    ...     optim.clip_by_global_norm(1.0),
    ...     optim.adamw(schedules.warmup_cosine_decay(0.0, 1e-3, 10, 100), weight_decay=0.05),
    ... )
    >>> params = {"w": torch.zeros(3)}
    >>> updates, opt_state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
    >>> params = optim.apply_updates(params, updates)
"""

from ._alias import adagrad as adagrad
from ._alias import adam as adam
from ._alias import adamw as adamw
from ._alias import lion as lion
from ._alias import nadam as nadam
from ._alias import radam as radam
from ._alias import rmsprop as rmsprop
from ._alias import sgd as sgd
from ._base import EmptyState as EmptyState
from ._base import GradientTransformation as GradientTransformation
from ._base import Scalar as Scalar
from ._base import ScalarOrSchedule as ScalarOrSchedule
from ._base import Schedule as Schedule
from ._base import apply_updates as apply_updates
from ._base import chain as chain
from ._base import identity as identity
from ._fused import updating_in_place as updating_in_place
from ._report import record as record
from ._report import report as report
from ._transform import ClipByGlobalNormState as ClipByGlobalNormState
from ._transform import EmaParamsState as EmaParamsState
from ._transform import ScaleByAdamState as ScaleByAdamState
from ._transform import ScaleByLionState as ScaleByLionState
from ._transform import ScaleByNadamState as ScaleByNadamState
from ._transform import ScaleByRadamState as ScaleByRadamState
from ._transform import ScaleByRmsState as ScaleByRmsState
from ._transform import ScaleByRssState as ScaleByRssState
from ._transform import ScaleByScheduleState as ScaleByScheduleState
from ._transform import TraceState as TraceState
from ._transform import add_decayed_weights as add_decayed_weights
from ._transform import clip as clip
from ._transform import clip_by_global_norm as clip_by_global_norm
from ._transform import ema_params as ema_params
from ._transform import ema_state as ema_state
from ._transform import scale as scale
from ._transform import scale_by_adam as scale_by_adam
from ._transform import scale_by_learning_rate as scale_by_learning_rate
from ._transform import scale_by_lion as scale_by_lion
from ._transform import scale_by_nadam as scale_by_nadam
from ._transform import scale_by_radam as scale_by_radam
from ._transform import scale_by_rms as scale_by_rms
from ._transform import scale_by_rss as scale_by_rss
from ._transform import scale_by_schedule as scale_by_schedule
from ._transform import set_to_zero as set_to_zero
from ._transform import trace as trace
from ._wrappers import ApplyIfFiniteState as ApplyIfFiniteState
from ._wrappers import InjectHyperparamsState as InjectHyperparamsState
from ._wrappers import MaskedNode as MaskedNode
from ._wrappers import MaskedState as MaskedState
from ._wrappers import MultiSteps as MultiSteps
from ._wrappers import MultiStepsState as MultiStepsState
from ._wrappers import PartitionState as PartitionState
from ._wrappers import apply_if_finite as apply_if_finite
from ._wrappers import get_hyperparams as get_hyperparams
from ._wrappers import inject_hyperparams as inject_hyperparams
from ._wrappers import masked as masked
from ._wrappers import partition as partition
from ._wrappers import set_hyperparams as set_hyperparams
