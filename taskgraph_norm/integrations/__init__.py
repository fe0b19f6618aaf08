"""Model integrations: put :class:`taskgraph_norm.RMSNorm` and
:class:`taskgraph_norm.LayerNorm` into other libraries' models.

Each integration imports its library lazily (``transformers``: the ``[hf]`` extra)
and calls only the public pieces (the module, the errors); see docs/model.md.
"""

from __future__ import annotations

from .transformers import norms_replaced as norms_replaced
from .transformers import register_norm_class as register_norm_class
from .transformers import replace_norms as replace_norms
from .transformers import replace_rmsnorm as replace_rmsnorm
from .transformers import restore_norms as restore_norms
from .transformers import restore_rmsnorm as restore_rmsnorm
from .transformers import rmsnorm_replaced as rmsnorm_replaced

__all__ = ["norms_replaced", "register_norm_class", "replace_norms", "replace_rmsnorm", "restore_norms",
           "restore_rmsnorm", "rmsnorm_replaced"]
