"""tf_breakeven: curvature and gradient noise of Keras models during training.

Measures the quantities of Jastrzebski et al. (ICLR 2020, the break-even
point) and Sankararaman et al. (ICML 2020, gradient confusion): top Hessian
eigenvalues, trace and spectral density; the spectrum and conditioning of
the gradient covariance; gradient confusion, diversity and noise scale.
"""

from tf_breakeven import functional, linalg, statistics
from tf_breakeven.gradients import (
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

__version__ = "0.1.0"

__all__ = [
    "HessianEigenpairs",
    "HessianOperator",
    "directional_curvature",
    "functional",
    "gradient_gram",
    "gradient_statistics",
    "hessian_eigenpairs",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_vector_product",
    "linalg",
    "per_example_gradients",
    "statistics",
]
