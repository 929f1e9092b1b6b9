"""The generation-length model: how many tokens will a request generate?

* :mod:`~throttllem._length.tokens`: the approximate token-counting rule (``approx-bpe-v1``)
  used for labels, features and scoring.
* :mod:`~throttllem._length.train`: training + ONNX export (needs the ``train`` extra).
* :mod:`~throttllem._length.runtime`: :class:`LengthModel`, serving with onnxruntime only.
* :mod:`~throttllem._length.oracle`: :class:`OraclePredictor` for trace replay (true length
  with injected error).
* :mod:`~throttllem._length.cli`: ``throttllem train length`` / ``throttllem length score``.
"""

from throttllem._length.data import QUANTILES, LengthExample, load_examples
from throttllem._length.oracle import OraclePredictor
from throttllem._length.runtime import DEFAULT_MODEL_DIR, LengthModel
from throttllem._length.tokens import TOKEN_RULE, count_tokens, count_tokens_many

__all__ = [
    "DEFAULT_MODEL_DIR",
    "QUANTILES",
    "TOKEN_RULE",
    "LengthExample",
    "LengthModel",
    "OraclePredictor",
    "count_tokens",
    "count_tokens_many",
    "load_examples",
]
