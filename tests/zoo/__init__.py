"""Tiny models and the steps run on them: ``catalogue`` (the models, as ``Entry`` records) and ``harness`` (adapt ->
train -> fold -> export -> verify -> ONNX Runtime parity on one case). Tests and benchmarks import it as ``zoo``
(tests/ is on their path): ``import zoo as Z`` then ``Z.BY_NAME["llama-sdpa"]``, ``Z.Case(entry, "export").run()``.
"""

from .catalogue import *  # noqa: F401,F403
from .catalogue import BATCH, OTHER_BATCH, OTHER_SEQ, SEQ  # noqa: F401
from .harness import *  # noqa: F401,F403
