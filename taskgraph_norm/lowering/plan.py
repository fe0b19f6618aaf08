"""The :class:`Plan`: a certified merge DAG as level-batched steps, pure data (no torch).

:mod:`.lower` makes one from a graph; the backends run it.  ``halving_steps`` and
``tree_levels`` are the two shapes a plan's steps take (a pairwise leaf's halvings,
the builder's tree of merges), shared by the plan's printout and the backends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import caches

__all__ = ["MERGES", "Plan", "halving_steps", "tree_levels"]

#: Merge kinds a plan can carry.
MERGES = ("single", "tree", "adds", "cat", "exact")


@dataclass(frozen=True)
class Plan:
    """A certified graph lowered to level-batched tensor steps (frozen, printable).

    Attributes
    ----------
    hidden_size, chunk_size:
        ``D`` and ``C``; ``n_full`` chunks of length ``C`` and a ragged ``tail``
        (``0`` when ``C`` divides ``D``).
    leaf:
        ``"pairwise"`` or ``"native"`` (float domain; the exact domain sums with
        ``torch.sum``, which is exact there).
    accumulate:
        ``"float"`` or ``"exact"``.
    merge:
        ``"single"`` (one chunk), ``"tree"`` (strided levels), ``"adds"`` (one
        column add per ADD, by level), ``"cat"`` (one ``torch.sum``) or ``"exact"``.
    adds:
        For ``"adds"``: levels of ``(dst, a, b)`` slot triples; slots ``0..n-1``
        are the leaves, ``n + j`` the j-th ADD.  ``root`` is the total's slot.
    fingerprint:
        The proof's fingerprint of the graph this plan was lowered from.
    casting_mode, offset, residual:
        FINALIZE's casting mode and weight offset, and whether INPUT adds a
        residual (``h = x + r``, then the plan runs on ``h``).
    norm:
        ``"rms"`` (RMSNorm: one sum of squares) or ``"layer"`` (LayerNorm: the
        chunking, leaves and merge above run twice, over ``x`` for the mean and over
        the squared deviations ``(x - mean)^2`` for the variance; the two DAGs of
        the graph lowered to this one recipe).
    """

    hidden_size: int
    chunk_size: int
    n_full: int
    tail: int
    leaf: str
    accumulate: str
    merge: str
    adds: tuple[tuple[tuple[int, int, int], ...], ...] = ()
    root: int = 0
    fingerprint: str = ""
    casting_mode: str = "torch"
    offset: float = 0.0
    residual: bool = False
    norm: str = "rms"

    @property
    def n_chunks(self) -> int:
        return self.n_full + (1 if self.tail else 0)

    @property
    def halving_steps(self) -> tuple[tuple[int, int], ...]:
        """``(L, h)`` of every pairwise step of a full chunk: ``s[:L-h] += s[h:L]``."""
        return halving_steps(self.chunk_size)

    @property
    def steps(self) -> tuple[str, ...]:
        """The plan as readable lines, one per tensor-op group, per row tile."""
        d, c, n = self.hidden_size, self.chunk_size, self.n_chunks
        lines: list[str] = []
        if self.residual:
            lines.append("residual: h = x + r in x's dtype over the tile (written out); x := h")
        if self.norm == "layer":
            return tuple(lines + self._layer_lines())
        if self.accumulate == "exact":
            lines += [
                f"square: v = x.to(fp64)**2 over the tile, shape (rows, {d})",
                "rowmax: M = amax(v, -1)  (max is exact: chunking and merge order are irrelevant)",
                "scale: (sigma1, sigma2) = kernels.exact_scale(M, D)",
                "preround fold 1: q1 = (v + sigma1) - sigma1; remainder r = v - q1",
                "preround fold 2: q2 = (r + sigma2) - sigma2",
                f"sum: (S1, S2) = (sum q1, sum q2) over whole rows (every addition exact, "
                f"so equal to the graph's {n}-leaf merge in any order)",
                "combine: total = (S1 + S2) in fp64, rounded to the accumulation dtype",
            ]
        else:
            lines.append(f"square: s = x.to(acc)**2 over the tile, shape (rows, {d})")
            if self.n_full:
                what = (
                    f"{len(self.halving_steps)} halving steps on the last dim"
                    if self.leaf == "pairwise" else "torch.sum on the last dim"
                )
                lines.append(f"leaves: view s[:, :{self.n_full * c}] as (rows, {self.n_full}, {c}); {what}")
            if self.tail:
                what = (
                    f"{len(halving_steps(self.tail))} halving steps"
                    if self.leaf == "pairwise" else "torch.sum"
                )
                lines.append(f"ragged leaf: s[:, {self.n_full * c}:{d}] ({self.tail} wide); {what}")
            lines += self._merge_lines()
        weight = "w.to(acc)" + (f" + {self.offset!r}" if self.offset else "")
        if self.casting_mode == "llama":
            weight = "w.to(p)" + (f" + {self.offset!r}" if self.offset else "")
            lines += [
                "finalize: rms = sqrt(total / D + eps); y = (x.to(acc) / rms).to(x.dtype)",
                f"llama: y = y.to(p) * ({weight}), p = promote_types(w.dtype, x.dtype), into the output tile",
            ]
            return tuple(lines)
        lines += [
            f"finalize: rms = sqrt(total / D + eps); y = x.to(acc) / rms; y *= {weight}"
            + (" (gemma)" if self.casting_mode == "gemma" else ""),
            "cast: y.to(x.dtype) into the output tile (skipped when acc is x.dtype)",
        ]
        return tuple(lines)

    def _layer_lines(self) -> list[str]:
        """LayerNorm's steps: the recipe twice (kernels/layer.py has the numerics)."""
        d = self.hidden_size
        if self.accumulate == "exact":
            lines = [
                "mean rowmax: M = amax(|x.to(fp64)|, -1); (sigma1, sigma2) = kernels.exact_scale(M, D)",
                "mean sum: (S1, S2) of x.to(fp64) pre-rounded on both grids, over whole rows "
                "(every addition exact: equal to the graph's merge in any order)",
                "mean: (S1 + S2) / D correctly rounded to acc (kernels.layer.mean_exact)",
                f"deviations: d = x.to(acc) - mean over the tile, shape (rows, {d})",
                "var rowmax: M = amax(d.to(fp64)**2, -1); (sigma1, sigma2) = kernels.exact_scale(M, D)",
                "var sum: (S1, S2) of d.to(fp64)**2 pre-rounded on both grids, over whole rows",
                "var: S1 + S2 correctly rounded to acc (kernels.layer.round_pair)",
            ]
        else:
            lines = [f"mean leaves: s = x.to(acc) over the tile, shape (rows, {d}); " + self._leaf_text()]
            lines += ["mean " + line for line in self._merge_lines()]
            lines.append("mean: total / D (a tensor divisor)")
            lines.append(f"deviations: d = x.to(acc) - mean; s = d * d, shape (rows, {d}); "
                         + self._leaf_text())
            lines += ["var " + line for line in self._merge_lines()]
        return lines + [
            "finalize: den = sqrt(var / D + eps); y = d / den; y *= w.to(acc); y += b.to(acc)",
            "cast: y.to(x.dtype) into the output tile (skipped when acc is x.dtype)",
        ]

    def _leaf_text(self) -> str:
        c, n = self.chunk_size, self.n_full
        what = "halving" if self.leaf == "pairwise" else "torch.sum"
        text = f"leaves over {n} chunks of {c}" if n else ""
        if self.tail:
            text += (" + " if text else "") + f"a ragged leaf of {self.tail}"
        return text + f" ({what})"

    def _merge_lines(self) -> list[str]:
        n = self.n_chunks
        if self.merge == "single":
            return ["merge: none (one chunk)"]
        if self.merge == "cat":
            return [f"merge: torch.sum over the ({n},) partials per row (kernels.catsum order)"]
        if self.merge == "tree":
            levels = tree_levels(n)
            return [
                f"merge level {i + 1}: p[:, :{k // 2}] = p[:, 0:{2 * (k // 2)}:2] + p[:, 1:{2 * (k // 2)}:2]"
                + (f"; carry p[:, {k - 1}]" if k % 2 else "")
                for i, k in enumerate(levels)
            ]
        total = sum(len(level) for level in self.adds)
        return [f"merge: {total} ordered column adds in {len(self.adds)} levels over the partials"]

    def __str__(self) -> str:
        head = (
            ("LayerNorm " if self.norm == "layer" else "")
            + f"Plan(D={self.hidden_size}, chunk={self.chunk_size}: {self.n_full} full"
            + (f" + 1 ragged ({self.tail})" if self.tail else "")
            + f", leaf={self.leaf}, accumulate={self.accumulate}, merge={self.merge}"
            + (f", casting_mode={self.casting_mode}" if self.casting_mode != "torch" else "")
            + (f", offset={self.offset!r}" if self.offset else "")
            + (", residual" if self.residual else "")
            + (f", proof {self.fingerprint}" if self.fingerprint else "")
            + ")"
        )
        return "\n".join([head] + [f"  {i + 1}. {s}" for i, s in enumerate(self.steps)])


@functools.lru_cache(maxsize=256)
def halving_steps(length: int) -> tuple[tuple[int, int], ...]:
    """The ``(L, h)`` sequence of :func:`kernels.pairwise_halving_` for one length."""
    steps = []
    while length > 1:
        half = (length + 1) // 2
        steps.append((length, half))
        length = half
    return tuple(steps)


def tree_levels(n: int) -> tuple[int, ...]:
    """The operand count of each level of the builder's tree over ``n`` partials."""
    levels = []
    while n > 1:
        levels.append(n)
        n = (n + 1) // 2
    return tuple(levels)


caches.register(halving_steps.cache_clear)
