"""The IMDB sentiment LSTM (embedding, LSTM, dense), unrolled."""

from __future__ import annotations

import keras

from .base import PACKAGE, ZooModel, check_int, check_rate


@keras.saving.register_keras_serializable(package=PACKAGE)
class LSTMClassifier(ZooModel):
    """Embedding -> LSTM -> dense logits over a fixed-length token sequence.

    Jastrzebski et al. (ICLR 2020, the break-even paper) train an LSTM on
    IMDB sentiment classification (2 classes). The defaults are the Keras
    `imdb_lstm` example: 20,000-word vocabulary, reviews cut or padded to 80
    tokens, 128-dimensional embedding, 128 LSTM units: 2,691,842 parameters
    with the 2-logit head used here (the example has one sigmoid unit and
    dropout 0.2 on inputs and recurrent state; both dropouts are arguments,
    off by default so the measured loss is deterministic). Token 0 is an
    ordinary token (no masking), as in the example.

    Why `unroll=True` (the default): TensorFlow 2.21 cannot run forward-mode
    autodiff through the backward pass of the `tf.while_loop` of a rolled LSTM
    (docs/pitfalls.md#P6), nor vectorize per-example gradients of it with pfor
    (docs/pitfalls.md#P11). Unrolled, the LSTM is `sequence_length` copies of
    the cell in the graph, so forward-over-backward Hessian-vector products
    (measured 1.7x a gradient) and vectorized per-example gradients (3.7x) work,
    with no while loop. The cost: the graph, its trace/compile time and the
    activation memory grow linearly with `sequence_length`, which must be static
    (fine at 80-500 tokens; for thousands of steps use `unroll=False`). With
    `unroll=False` tf_breakeven still gives exact numbers, through
    backward-over-backward HVPs and a sequential `tf.map_fn` loop for sample
    gradients (several times slower).

    Args:
        num_classes: output logits (2 for IMDB).
        vocabulary_size: number of token ids (inputs are int ids in
            [0, vocabulary_size)).
        sequence_length: tokens per example (static).
        embedding_dim: embedding width.
        units: LSTM state size.
        dropout: LSTM input dropout rate.
        recurrent_dropout: LSTM recurrent-state dropout rate.
        unroll: unroll the LSTM over time (see above).
        name: model name.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(
        self,
        num_classes: int = 2,
        vocabulary_size: int = 20000,
        sequence_length: int = 80,
        embedding_dim: int = 128,
        units: int = 128,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        unroll: bool = True,
        name: str = "imdb_lstm",
        **kwargs,
    ):
        config = {
            "num_classes": check_int("num_classes", num_classes),
            "vocabulary_size": check_int("vocabulary_size", vocabulary_size),
            "sequence_length": check_int("sequence_length", sequence_length),
            "embedding_dim": check_int("embedding_dim", embedding_dim),
            "units": check_int("units", units),
            "dropout": check_rate("dropout", dropout),
            "recurrent_dropout": check_rate(
                "recurrent_dropout", recurrent_dropout
            ),
            "unroll": bool(unroll),
        }
        inputs = keras.Input(
            (config["sequence_length"],), dtype="int32", name="token_ids"
        )
        x = keras.layers.Embedding(
            config["vocabulary_size"], config["embedding_dim"], name="embedding"
        )(inputs)
        x = keras.layers.LSTM(
            config["units"],
            dropout=config["dropout"],
            recurrent_dropout=config["recurrent_dropout"],
            unroll=config["unroll"],
            name="lstm",
        )(x)
        outputs = keras.layers.Dense(config["num_classes"], name="logits")(x)
        super().__init__(inputs, outputs, config=config, name=name, **kwargs)
