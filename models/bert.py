"""BERT sentence(-pair) classifier from keras-hub, from a config or preset."""

from __future__ import annotations

import os
from typing import Any

import keras_hub
from absl import logging

from .base import check_int, check_rate

# Devlin et al. 2019 (base, large) and Turc et al. 2019 (the small BERTs);
# all with the 30,522-token uncased WordPiece vocabulary and 512 positions.
BERT_CONFIGS = {
    "bert_tiny": {"num_layers": 2, "num_heads": 2, "hidden_dim": 128},
    "bert_small": {"num_layers": 4, "num_heads": 8, "hidden_dim": 512},
    "bert_medium": {"num_layers": 8, "num_heads": 8, "hidden_dim": 512},
    "bert_base": {"num_layers": 12, "num_heads": 12, "hidden_dim": 768},
    "bert_large": {"num_layers": 24, "num_heads": 16, "hidden_dim": 1024},
}


def bert_classifier(
    num_classes: int | None = 3,
    *,
    preset: str | None = None,
    config: str = "bert_base",
    vocabulary_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    hidden_dim: int | None = None,
    intermediate_dim: int | None = None,
    max_sequence_length: int | None = None,
    dropout: float = 0.1,
    dtype: Any = None,
    name: str | None = None,
) -> keras_hub.models.BertTextClassifier:
    """A keras-hub `BertTextClassifier` (backbone + pooled dense head).

    This function is long because its docstring documents the architecture
    and every argument; the preset branch is `_from_preset`.

    Jastrzebski et al. (ICLR 2020, the break-even paper) fine-tune
    pretrained BERT-base on MNLI (3 classes, sentence pairs). BERT-base
    (Devlin et al. 2019): 12 layers, 12 heads, hidden size 768, feed-forward
    3072, 30,522-token vocabulary, 512 positions, 2 segments: 109,482,240
    backbone parameters, 109,484,547 with the 3-class head (published:
    110M).

    The model takes a dict of int tensors `token_ids`, `segment_ids` and
    `padding_mask`, each `[batch, length]` with any length up to
    `max_sequence_length` (no preprocessor is attached: tokenize outside the
    model), and returns `num_classes` logits. Its `get_config()` (keras-hub's)
    stores the backbone arguments, `num_classes` and `dropout`, and it
    saves and loads as a `.keras` file or with `save_to_preset`.

    Pretrained weights come from `preset`: a directory on disk written by
    keras-hub (`save_to_preset`, or a downloaded Kaggle/Hugging Face preset)
    is loaded without network access; any other string is handed to
    keras-hub, which downloads it (e.g. "bert_base_en_uncased"). Without
    `preset` the weights are freshly initialized and no file is read.
    Hessian-vector products go through LayerNormalization, which
    tf_breakeven differentiates exactly (docs/pitfalls.md#P1), and
    per-example gradients through its pfor-safe einsum
    (docs/pitfalls.md#P12).

    Args:
        num_classes: output logits (3 for MNLI). With `preset`, None keeps
            the preset's own classifier head and its weights; an int gives
            a fresh head (keras-hub then loads only the backbone weights).
        preset: a preset directory or keras-hub preset name (see above).
        config: named architecture when `preset` is None: one of
            `BERT_CONFIGS` (bert_tiny, bert_small, bert_medium, bert_base,
            bert_large); the explicit arguments below override it.
        vocabulary_size: number of token ids (30,522).
        num_layers: transformer layers.
        num_heads: attention heads.
        hidden_dim: hidden size.
        intermediate_dim: feed-forward size (4 * hidden_dim).
        max_sequence_length: position embeddings (512).
        dropout: dropout rate of the backbone and of the head (with
            `preset`, of the head only: the backbone keeps the preset's).
        dtype: dtype policy of all layers (None: the global policy).
        name: model name.

    Returns:
        An uncompiled `keras_hub.models.BertTextClassifier` without a
        preprocessor.

    Raises:
        ValueError: unknown `config`, bad sizes, or architecture arguments
            together with `preset`.
    """
    dropout = check_rate("dropout", dropout)
    architecture = {
        "vocabulary_size": vocabulary_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "max_sequence_length": max_sequence_length,
    }
    given = {k: v for k, v in architecture.items() if v is not None}
    extra = {"name": name} if name is not None else {}
    if preset is not None:
        if dtype is not None:
            extra["dtype"] = dtype
        return _from_preset(preset, num_classes, dropout, given, extra)
    if config not in BERT_CONFIGS:
        raise ValueError(
            f"unknown BERT config {config!r}; available: "
            f"{', '.join(BERT_CONFIGS)}. Or pass `preset=` a preset directory."
        )
    if num_classes is None:
        raise ValueError("`num_classes` must be an int without `preset`.")
    sizes = dict(BERT_CONFIGS[config])
    sizes.update(
        vocabulary_size=30522,
        intermediate_dim=4 * (hidden_dim or sizes["hidden_dim"]),
        max_sequence_length=512,
    )
    sizes.update(given)
    sizes = {k: check_int(k, v) for k, v in sizes.items()}
    if sizes["hidden_dim"] % sizes["num_heads"]:
        raise ValueError(
            f"`hidden_dim` ({sizes['hidden_dim']}) must be divisible by "
            f"`num_heads` ({sizes['num_heads']})."
        )
    backbone = keras_hub.models.BertBackbone(
        **sizes, dropout=dropout, dtype=dtype
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone,
        num_classes=check_int("num_classes", num_classes),
        preprocessor=None,
        dropout=dropout,
        dtype=dtype,
        **extra,
    )


def _from_preset(
    preset: str,
    num_classes: int | None,
    dropout: float,
    given: dict,
    extra: dict,
) -> keras_hub.models.BertTextClassifier:
    """`bert_classifier` from a keras-hub preset (see its docstring)."""
    if given:
        raise ValueError(
            "Pass either `preset` or architecture arguments, not both; "
            f"got preset={preset!r} and {sorted(given)}. A preset fixes "
            "the architecture."
        )
    if not os.path.isdir(preset):
        logging.info(
            "tf_breakeven: %r is not a local directory; keras-hub will "
            "try to download the preset.",
            preset,
        )
    if num_classes is not None:
        extra["num_classes"] = check_int("num_classes", num_classes)
    return keras_hub.models.BertTextClassifier.from_preset(
        preset, preprocessor=None, dropout=dropout, **extra
    )
