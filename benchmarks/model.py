"""taskgraph_norm in a Hugging Face model: stock against replaced norms (issue 14, items 6 and 7).

    python benchmarks/model.py [--families llama,gemma] [--hidden 4096] [--batches 1,2,7,16,64]
                               [--rounds 5] [--no-compile]

Tiny randomly initialised models (no downloads): ``--layers`` decoder layers of
hidden size ``--hidden`` with a small vocabulary and MLP, so they run on a small
CPU; the norm weights are perturbed so the weight and Gemma's ``1 + w`` matter.
Each family's model is measured stock and with :func:`replace_rmsnorm`, side by side:

1. *Closeness*: the replaced logits against stock, fp32 and bf16 (max abs
   difference and the share of logits that differ at all).
2. *Batch invariance, eager, fp32*: one sequence alone, then as row 0 of batches
   of ``--batches`` sizes (same-length sequences).  For the norms: (a) every norm
   row of the batched run normalised again alone by the same module (the norm's own
   batch invariance: 0 rows may differ for ours), (b) the probe's norm calls in the
   model, where their input bits equal the alone run's, and whether the outputs do.
   For the logits: is the probe's row the alone run's bits?  Matmuls and attention
   are not ours, so the logits are invariant only where those layers are.
3. *torch.compile(fullgraph=True)*: graph and graph-break counts from
   ``torch._dynamo.explain``; a fullgraph compile of each model; if both compile,
   the compiled step time of the replaced model against stock (target <= 1.1x),
   as interleaved medians with the eager times beside them.  If the replaced model
   breaks graphs or fails to compile (as before the norm became a torch.library
   op), the script says so and times the eager steps only.

The machine load is printed at the start and the end: timings taken on a busy
machine are noisy, the ratios (measured in the same rounds) less so.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import TARGET_HEADER, interleaved_medians, target_row  # noqa: E402
from taskgraph_norm.integrations import replace_rmsnorm, rmsnorm_replaced  # noqa: E402
from taskgraph_norm.testing import bits_equal  # noqa: E402

SEQ = 8  # tokens per sequence in the invariance runs
Call = tuple[nn.Module, torch.Tensor, torch.Tensor]


def build(family: str, hidden: int, layers: int, vocab: int, intermediate: int) -> nn.Module:
    import transformers

    shape: dict[str, Any] = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                                 head_dim=128, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = {"llama": transformers.LlamaConfig, "gemma": transformers.GemmaConfig,
              "gemma3": transformers.Gemma3TextConfig, "qwen3": transformers.Qwen3Config}[family](**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits  # type: ignore[no-any-return]


def is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def norm_calls(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[Call]]:
    calls: list[Call] = []
    handles = [m.register_forward_hook(lambda m, a, out: calls.append((m, a[0], out)))
               for m in model.modules() if is_norm(m)]
    try:
        return logits(model, ids), calls
    finally:
        for h in handles:
            h.remove()


def rows_differing_alone(calls: list[Call]) -> tuple[int, int]:
    """(rows a norm gives other bits alone than inside its batch, rows checked)."""
    bad = total = 0
    with torch.no_grad():
        for module, x, y in calls:
            xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            bad += sum(not bits_equal(module(xs[i:i + 1]), ys[i:i + 1]) for i in range(xs.shape[0]))
            total += xs.shape[0]
    return bad, total


def probe_calls(alone: list[Call], batched: list[Call]) -> str:
    """The probe's (row 0's) norm calls in the batched run against the alone run."""
    same_in = same_out = 0
    for (_, xa, ya), (_, xb, yb) in zip(alone, batched):
        if bits_equal(xa, xb[:1]):
            same_in += 1
            same_out += bits_equal(ya, yb[:1])
    return f"{same_out}/{same_in} of {len(alone)}"


def invariance(model: nn.Module, batches: list[int], vocab: int) -> dict[int, list[str]]:
    """One row per batch size: logits and norm figures for this model as it is now."""
    ids = torch.randint(3, vocab, (max(batches), SEQ), generator=torch.Generator().manual_seed(1))
    alone_logits, alone = norm_calls(model, ids[:1])
    rows: dict[int, list[str]] = {}
    for b in batches:
        out, calls = norm_calls(model, ids[:b])
        same = bits_equal(out[:1], alone_logits)
        gap = (out[:1] - alone_logits).abs().max().item()
        bad, total = rows_differing_alone(calls)
        rows[b] = ["equal" if same else f"differ (max {gap:.1e})", f"{bad}/{total}", probe_calls(alone, calls)]
    return rows


def print_invariance(stock: dict[int, list[str]], ours: dict[int, list[str]]) -> None:
    print("| batch | logits row 0 vs alone: stock | replaced | norm rows differing when re-run alone: stock"
          " | replaced | probe norm calls, outputs equal / inputs equal: stock | replaced |")
    print("|---|---|---|---|---|---|---|")
    for b in stock:
        s, o = stock[b], ours[b]
        print(f"| {b} | {s[0]} | {o[0]} | {s[1]} | {o[1]} | {s[2]} | {o[2]} |")


def closeness(model: nn.Module, vocab: int) -> None:
    """Replaced against stock: each norm on the stock run's inputs, and the logits."""
    ids = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(2))
    names = {m: n for n, m in model.named_modules()}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)  # bf16 last: the model is not used in fp32 after this
        stock, calls = norm_calls(model, ids)
        with rmsnorm_replaced(model), torch.no_grad():
            ours = logits(model, ids)
            differ = [(model.get_submodule(names[m])(x) != y).sum().item() for m, x, y in calls]
        total = sum(y.numel() for _, _, y in calls)
        diff = (ours.float() - stock.float()).abs()
        print(f"  {str(dtype).removeprefix('torch.'):>8}: norm outputs on the same inputs: {sum(differ)} of "
              f"{total} elements differ; logits: max abs diff {diff.max().item():.3g} (logits up to "
              f"{stock.abs().max().item():.3g}), {100 * (diff > 0).float().mean().item():.3f}% differ")


def explain(model: nn.Module, ids: torch.Tensor) -> str:
    torch._dynamo.reset()
    out = torch._dynamo.explain(lambda: logits(model, ids))()
    reason = f"; first break: {str(out.break_reasons[0].reason).splitlines()[0][:90]}" if out.break_reasons else ""
    return f"{out.graph_count} graph(s), {out.graph_break_count} break(s){reason}"


def compiled(model: nn.Module, ids: torch.Tensor) -> tuple[Callable[[], object] | None, str]:
    """A fullgraph-compiled step, or None with the reason."""
    fn = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            fn(input_ids=ids, use_cache=False)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return None, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    def step() -> object:
        with torch.no_grad():
            return fn(input_ids=ids, use_cache=False)

    return step, f"compiles ({time.perf_counter() - start:.0f} s)"


def compile_section(stock: nn.Module, ours: nn.Module, vocab: int, rounds: int) -> None:
    ids = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(3))
    print(f"  explain, stock:    {explain(stock, ids)}")
    print(f"  explain, replaced: {explain(ours, ids)}")
    torch._dynamo.reset()
    stock_step, stock_says = compiled(stock, ids)
    ours_step, ours_says = compiled(ours, ids)
    print(f"  torch.compile(fullgraph=True): stock {stock_says}; replaced {ours_says}")
    methods: dict[str, Callable[[], object]] = {"stock eager": lambda: logits(stock, ids),
                                                "replaced eager": lambda: logits(ours, ids)}
    if stock_step is not None and ours_step is not None:
        methods |= {"stock compiled": stock_step, "replaced compiled": ours_step}
    else:
        print("  ** a model does not compile with fullgraph=True (see above): no compiled timing **")
    times = interleaved_medians(methods, rounds)
    print(f"\n  one forward of {tuple(ids.shape)} tokens, fp32, median of {rounds} interleaved rounds:\n")
    print(TARGET_HEADER)
    print(target_row("eager step", times["replaced eager"], times["stock eager"], "stock eager", None))
    if "replaced compiled" in times:
        print(target_row("compiled step", times["replaced compiled"], times["stock compiled"], "stock compiled", 1.1))


def family_report(family: str, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model = build(family, args.hidden, args.layers, args.vocab, args.intermediate)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n## {family}: hidden {args.hidden}, {args.layers} layers, {params / 1e6:.0f}M parameters\n")
    stock_rows = invariance(model, args.batches, args.vocab)
    ours = copy.deepcopy(model)
    names = replace_rmsnorm(ours)
    modes = sorted({f"{m.casting_mode}, offset {m.offset}" for m in ours.modules() if isinstance(m, tgn.RMSNorm)})
    print(f"replaced {len(names)} norms ({'; '.join(modes)})\n")
    print(f"Batch invariance, eager, fp32, {SEQ} tokens per sequence, sequence 0 alone vs row 0 of a batch:\n")
    print_invariance(stock_rows, invariance(ours, args.batches, args.vocab))
    if args.compile:
        print("\ntorch.compile:")
        compile_section(model, ours, args.vocab, args.rounds)
    del ours
    print("\nCloseness to stock, a (4, 16) batch:")
    closeness(model, args.vocab)
    print(f"\n({time.perf_counter() - t0:.0f} s for {family})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="llama,gemma")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--batches", default="1,2,7,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    warnings.filterwarnings("ignore", message=".*lru_cache.*")  # dynamo tracing our graph cache
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, machine load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for family in args.families.split(","):
        family_report(family, args)
    print(f"\nmachine load at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
