"""tf_breakeven: curvature and gradient noise of Keras models during training.

Measures the quantities of Jastrzebski et al. (ICLR 2020, the break-even
point) and Sankararaman et al. (ICML 2020, gradient confusion): top Hessian
eigenvalues, trace and spectral density; the spectrum and conditioning of
the gradient covariance; gradient confusion, diversity and noise scale.
"""

import importlib
from typing import Any

from tf_breakeven import (
    blocks,
    callbacks,
    curvature,
    distribute,
    functional,
    gradients,
    hessian,
    linalg,
    operators,
    preconditioning,
    presets,
    recording,
    schedules,
    sharpness,
    spectrum,
    stability,
    statistics,
    step_probes,
    training,
    validation,
)
from tf_breakeven.callbacks import (
    BreakEven,
    GradientConfusion,
    GradientCovariance,
    HessianSpectrum,
    ProbeLoss,
)
from tf_breakeven.curvature import directional_curvature
from tf_breakeven.gradients import (
    gradient_covariance_eigenpairs,
    gradient_gram,
    gradient_statistics,
    gradient_trace_by_block,
    per_example_gradients,
)
from tf_breakeven.hessian import (
    BlockHessianOperator,
    HessianEigenpairs,
    HessianOperator,
    hessian_eigenpairs,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hessian_vector_product,
)
from tf_breakeven.preconditioning import (
    preconditioned_hessian_eigenpairs,
    preconditioned_hessian_eigenvalues,
)
from tf_breakeven.presets import make_probe, preset
from tf_breakeven.recording import Recorder, read_records
from tf_breakeven.sharpness import batch_sharpness, gradient_alignment
from tf_breakeven.spectrum import Eigenpairs
from tf_breakeven.training import TrackingConfig, TrackingModel, track

__version__ = "0.1.0"

# Imported on first use, so `import tf_breakeven` imports no plotting
# library and never touches a notebook's matplotlib backend.
_LAZY_MODULES = ("plotting",)


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"tf_breakeven.{name}")
    raise AttributeError(f"module 'tf_breakeven' has no attribute {name!r}")


__all__ = [
    "BlockHessianOperator",
    "BreakEven",
    "Eigenpairs",
    "GradientConfusion",
    "GradientCovariance",
    "HessianEigenpairs",
    "HessianOperator",
    "HessianSpectrum",
    "ProbeLoss",
    "Recorder",
    "TrackingConfig",
    "TrackingModel",
    "batch_sharpness",
    "blocks",
    "callbacks",
    "curvature",
    "directional_curvature",
    "distribute",
    "functional",
    "gradient_alignment",
    "gradient_covariance_eigenpairs",
    "gradient_gram",
    "gradient_statistics",
    "gradient_trace_by_block",
    "gradients",
    "hessian",
    "hessian_eigenpairs",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_vector_product",
    "linalg",
    "make_probe",
    "operators",
    "per_example_gradients",
    "plotting",
    "preconditioned_hessian_eigenpairs",
    "preconditioned_hessian_eigenvalues",
    "preconditioning",
    "preset",
    "presets",
    "read_records",
    "recording",
    "schedules",
    "sharpness",
    "spectrum",
    "stability",
    "statistics",
    "step_probes",
    "track",
    "training",
    "validation",
]
