"""tf_breakeven: curvature and gradient noise of Keras models during training.

Measures the quantities of Jastrzebski et al. (ICLR 2020, the break-even
point) and Sankararaman et al. (ICML 2020, gradient confusion): top Hessian
eigenvalues, trace and spectral density; the spectrum and conditioning of
the gradient covariance; gradient confusion, diversity and noise scale.
"""

from tf_breakeven import (
    callbacks,
    distribute,
    functional,
    linalg,
    plotting,
    presets,
    recording,
    schedules,
    stability,
    statistics,
    training,
)
from tf_breakeven.callbacks import (
    BreakEven,
    GradientConfusion,
    GradientCovariance,
    HessianSpectrum,
)
from tf_breakeven.gradients import (
    gradient_covariance_eigenpairs,
    gradient_gram,
    gradient_statistics,
    per_example_gradients,
)
from tf_breakeven.hessian import (
    HessianEigenpairs,
    HessianOperator,
    directional_curvature,
    hessian_eigenpairs,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hessian_vector_product,
)
from tf_breakeven.presets import make_probe, preset
from tf_breakeven.recording import Recorder, read_records
from tf_breakeven.training import TrackingConfig, TrackingModel, track

__version__ = "0.1.0"

__all__ = [
    "BreakEven",
    "GradientConfusion",
    "GradientCovariance",
    "HessianEigenpairs",
    "HessianOperator",
    "HessianSpectrum",
    "Recorder",
    "TrackingConfig",
    "TrackingModel",
    "callbacks",
    "distribute",
    "directional_curvature",
    "functional",
    "gradient_covariance_eigenpairs",
    "gradient_gram",
    "gradient_statistics",
    "hessian_eigenpairs",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_vector_product",
    "linalg",
    "make_probe",
    "per_example_gradients",
    "plotting",
    "preset",
    "presets",
    "read_records",
    "recording",
    "schedules",
    "stability",
    "statistics",
    "track",
    "training",
]
