"""`GradientConfusion`: pairwise cosines of sample gradients."""

from __future__ import annotations

import numpy as np

from tf_breakeven.callbacks.gradient_noise import GramCallback


class GradientConfusion(GramCallback):
    """Gradient confusion and pairwise cosine similarities.

    The confusion paper's protocol with the probe set split into
    mini-batches of `microbatch_size` examples (e.g. 128), or single
    examples (1): logs `confusion/*` keys over all pairs, and records the
    cosine histogram (TensorBoard histogram `confusion/cosines`; the JSONL
    record holds counts over 100 bins in [-1, 1]). Arguments: see
    `GramCallback` (`k` is only recorded).
    """

    prefixes = ("confusion/", "probe/")
    cosines_histogram = True

    @property
    def cosines(self) -> np.ndarray | None:
        """The pairwise cosines of the last measurement."""
        return self.measurement.last_cosines
