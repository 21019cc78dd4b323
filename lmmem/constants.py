"""Values every layer of lmmem agrees on, in the lowest module so that any layer may import them.

``IGNORE_INDEX``: a target with this value is not scored — no loss, no gradient, no Hebbian
statistics, no perplexity count. It is PyTorch's own default (``F.cross_entropy``'s
``ignore_index``) and Hugging Face's label padding value, so batches built elsewhere need no
translation. lmmem's batching puts it on padded and context-only positions.
"""

from __future__ import annotations

IGNORE_INDEX = -100
