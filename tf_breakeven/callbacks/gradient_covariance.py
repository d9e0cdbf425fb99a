"""`GradientCovariance`: spectrum and conditioning of the covariance K."""

from __future__ import annotations

from tf_breakeven.callbacks.gradient_noise import GramCallback


class GradientCovariance(GramCallback):
    """Spectrum and conditioning of the gradient covariance K.

    Logs the `grad_cov/*`, `grad_cov_uncentered/*`, `grad/*` and `probe/*`
    keys of `tf_breakeven.statistics.metric_keys`, from gradients of
    micro-batches of `microbatch_size` examples (the paper: M = 128 on ~5%
    of the training set). With `blocks="layer"` (or a mapping of variables)
    it also logs `grad_cov/trace/<block>`, each block's share of
    `grad_cov/trace`, from the same gradients. Arguments: see
    `GramCallback`.
    """

    prefixes = ("grad_cov/", "grad_cov_uncentered/", "grad/", "probe/")
