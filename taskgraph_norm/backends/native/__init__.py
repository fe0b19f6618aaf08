"""The native C kernels: the sources (``csrc/``), the loader of the built
``_native_*`` libraries next to it, their ABI, the direct call, the backward's
and the exact weight gradient's entry points, and the team that shares the rows."""
