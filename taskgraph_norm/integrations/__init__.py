"""Model integrations: put :class:`taskgraph_norm.RMSNorm` into other libraries' models.

Each integration imports its library lazily (``transformers``: the ``[hf]`` extra)
and calls only the public pieces (the module, the errors); see docs/model.md.
"""

from __future__ import annotations

from .transformers import register_norm_class as register_norm_class
from .transformers import replace_rmsnorm as replace_rmsnorm
from .transformers import restore_rmsnorm as restore_rmsnorm
from .transformers import rmsnorm_replaced as rmsnorm_replaced

__all__ = ["register_norm_class", "replace_rmsnorm", "restore_rmsnorm", "rmsnorm_replaced"]
