"""Rank functions for tests/test_dtensor.py, run in spawned processes by ``run_local``.

Each rank builds the same global tensors from a seed, runs the DTensor path, and
compares what it gets with the one-process result on the full tensors, bit for bit;
it returns the names of the checks that failed (and the negative controls' findings),
so one spawn per world size covers every case.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import anyio
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import taskgraph_norm as tgn

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits."""
    if isinstance(a, DTensor):
        a = a.full_tensor()
    if isinstance(b, DTensor):
        b = b.full_tensor()
    return bool(a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a.contiguous().view(INT[a.dtype]), b.contiguous().view(INT[b.dtype])))


def data(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` with a wide exponent spread (rounding order shows), ``dy`` and a weight."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-10, 10, shape, generator=g).double())
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, dy, w


def one_process(call: Callable[..., Any], x: torch.Tensor, dy: torch.Tensor, *params: torch.Tensor) -> list[Any]:
    """``[y, dx, dparam...]`` of ``call(x, *params)`` on one process."""
    xs = x.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    y = call(xs, *ps)
    y.backward(dy)
    return [y.detach(), xs.grad, *[p.grad for p in ps]]


PLACEMENTS = {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Shard(-1)": Shard(-1), "Replicate": Replicate()}


def xd_placements(mesh: Any, x: torch.Tensor, placement: Any) -> tuple[Any, ...]:
    """The placements ``distribute_tensor`` gives (a negative dim made positive)."""
    return tuple(distribute_tensor(x[:1], mesh, [placement]).placements)


def _dtensor_run(mesh: Any, placement: Any, call: Callable[..., Any], x: torch.Tensor, dy: torch.Tensor,
                 w: torch.Tensor, weight_kind: str) -> tuple[Any, Any, Any]:
    xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
    wd = (distribute_tensor(w, mesh, [Replicate()]) if weight_kind == "dtensor" else w.clone()).requires_grad_()
    y = call(xd, wd)
    y.backward(distribute_tensor(dy, mesh, [placement]))
    return y, xd.grad, wd.grad


def check_faces(rank: int, world: int) -> dict[str, Any]:
    """normalize_sync and layer_norm_sync on every placement, dtype and weight kind."""
    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    found: dict[str, bool] = {}
    shapes = [(3, 5, 97), (2, 4, 256)]
    for n, shape in enumerate(shapes):
        for dtype in (torch.float32, torch.bfloat16):
            x, dy, w = data(n, shape, dtype)
            for accumulate in ("float", "exact"):
                def rms(a: Any, b: Any) -> Any:
                    return tgn.normalize_sync(a, b, accumulate=accumulate, chunk_size=16)
                ref = one_process(rms, x, dy, w)
                for pname, placement in PLACEMENTS.items():
                    for kind in ("dtensor", "plain"):
                        tag = f"rms {shape} {dtype} {accumulate} {pname} {kind}"
                        y, dx, dw = _dtensor_run(mesh, placement, rms, x, dy, w, kind)
                        if not isinstance(y, DTensor) or y.placements != xd_placements(mesh, x, placement):
                            failed.append(f"{tag}: placements {getattr(y, 'placements', type(y))}")
                        if not same(y, ref[0]):
                            failed.append(f"{tag}: y")
                        if not same(dx, ref[1]):
                            failed.append(f"{tag}: dx")
                        row_sharded = pname in ("Shard(0)", "Shard(1)")  # dW: Partial(), as torch's
                        rows = row_sharded and world > 1
                        if kind == "dtensor":
                            if dw.placements[0].is_partial() != row_sharded or (
                                    not row_sharded and dw.placements[0] != Replicate()):
                                failed.append(f"{tag}: dW placement {dw.placements}")
                        full = dw.full_tensor() if isinstance(dw, DTensor) else dw
                        if rows:  # a float reduction over ranks: close, bits not promised
                            found[tag] = not same(full, ref[2])
                            scale = float(ref[2].float().abs().max())
                            if not torch.allclose(full.float(), ref[2].float(), rtol=2e-2, atol=2e-2 * scale):
                                failed.append(f"{tag}: dW not close")
                        elif not same(full, ref[2]):
                            failed.append(f"{tag}: dW")
            if accumulate == "exact" and n == 0:  # LayerNorm: rows sharded or replicated
                b = w - 1
                ref = one_process(lambda a, c, d: tgn.layer_norm_sync(a, c, d), x, dy, w, b)
                for pname in ("Shard(0)", "Shard(1)", "Replicate"):
                    xd = distribute_tensor(x, mesh, [PLACEMENTS[pname]]).requires_grad_()
                    y = tgn.layer_norm_sync(xd, distribute_tensor(w, mesh, [Replicate()]), b)
                    y.backward(distribute_tensor(dy, mesh, [PLACEMENTS[pname]]))
                    if not all([same(y, ref[0]), same(xd.grad, ref[1])]):
                        failed.append(f"layer_norm {dtype} {pname}")
    # a planted one-ulp change must be seen by the comparison
    x, _, w = data(9, (4, 8), torch.float32)
    y = tgn.normalize_sync(distribute_tensor(x, mesh, [Shard(0)]), w)
    bent = y.full_tensor().clone()
    bent.view(torch.int32)[0, 0] += 1
    found["planted ulp"] = not same(bent, tgn.normalize_sync(x, w))
    return {"failed": failed, "found": found}


def check_modules(rank: int, world: int) -> dict[str, Any]:
    """tgn.RMSNorm (float and exact dW) and tgn.LayerNorm modules on DTensors, the
    errors, and Liger-Kernel's DTensor cases."""
    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        x, dy, w = data(3, (2, 6, 50), dtype)
        ref_norm = tgn.RMSNorm(50, weight_grad="exact", dtype=dtype)
        with torch.no_grad():
            ref_norm.weight.copy_(w)
        ref = one_process(lambda a: ref_norm(a), x, dy)
        for pname, placement in PLACEMENTS.items():
            norm = tgn.RMSNorm(50, weight_grad="exact", dtype=dtype)
            norm.weight = nn.Parameter(distribute_tensor(w, mesh, [Replicate()]))
            xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
            y = norm(xd)
            y.backward(distribute_tensor(dy, mesh, [placement]))
            g = norm.weight.grad
            if not all([same(y, ref[0]), same(xd.grad, ref[1])]):
                failed.append(f"exact module {dtype} {pname}: y or dx")
            if not isinstance(g, DTensor) or tuple(g.placements) != (Replicate(),) or not same(
                    g, ref_norm.weight.grad):
                failed.append(f"exact module {dtype} {pname}: dW {getattr(g, 'placements', None)}")
    # several normalised dims (rows sharded), and the residual
    x, dy, w = data(4, (3, 4, 6), torch.float32)
    norm2 = tgn.RMSNorm((4, 6))
    with torch.no_grad():
        norm2.weight.copy_(w.expand(4, 6) * 0 + 1.5)
    xd = distribute_tensor(x, mesh, [Shard(0)])
    if not same(norm2(xd), norm2(x)):
        failed.append("RMSNorm((4, 6)) on Shard(0)")
    ln = tgn.LayerNorm((4, 6))
    if not same(ln(xd), ln(x)):
        failed.append("LayerNorm((4, 6)) on Shard(0)")
    r = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(7))
    y, h = tgn.normalize_sync(distribute_tensor(x, mesh, [Shard(-1)]), w, residual=distribute_tensor(
        r, mesh, [Shard(-1)]))
    y1, h1 = tgn.normalize_sync(x, w, residual=r)
    y1 = tgn.normalize_sync(x, w)
    if not all([same(y, tgn.normalize_sync(x + r, w)), same(h, h1)]):  # (every rank gathers both)
        failed.append("residual on Shard(-1)")
    for pname in ("Shard(1)", "Shard(-1)"):  # no gradient recorded: the same bits
        xd = distribute_tensor(x, mesh, [PLACEMENTS[pname]])
        with torch.no_grad():
            y_no_grad = tgn.normalize_sync(xd, w)
        with torch.inference_mode():
            y_inference = tgn.normalize_sync(xd, w)
        if not all([same(y_no_grad, y1), same(y_inference, y1)]) or not isinstance(y_inference, DTensor):
            failed.append(f"no_grad / inference_mode on {pname}")
    # the async faces, and a Partial() x (reduced to Replicate() first: rank 0 holds it all)
    xd = distribute_tensor(x, mesh, [Shard(0)])
    y_async = anyio.run(functools.partial(tgn.normalize, xd, w))
    ln_async = anyio.run(functools.partial(tgn.layer_norm, xd, w))
    partial = DTensor.from_local(x if rank == 0 else torch.zeros_like(x), mesh, [Partial()])
    y_partial = tgn.normalize_sync(partial, w)
    if not all([same(y_async, y1), same(ln_async, tgn.layer_norm_sync(x, w)), same(y_partial, y1)]):
        failed.append("async faces or Partial()")
    if tuple(y_partial.placements) != (Replicate(),):
        failed.append(f"Partial() x gave {y_partial.placements}")
    # rows enough to split across threads, D a multiple of no world size
    x, dy, w = data(6, (2, 1500, 67), torch.float32)
    ref = one_process(lambda a, b: tgn.normalize_sync(a, b), x, dy, w)
    for pname in ("Shard(1)", "Shard(-1)"):
        y, dx, _ = _dtensor_run(mesh, PLACEMENTS[pname], lambda a, b: tgn.normalize_sync(a, b), x, dy, w, "dtensor")
        if not all([same(y, ref[0]), same(dx, ref[1])]):
            failed.append(f"(2, 1500, 67) {pname}")
    # no weight, the hidden dim sharded
    ref = one_process(lambda a: tgn.normalize_sync(a), x, dy)
    xd = distribute_tensor(x, mesh, [Shard(-1)]).requires_grad_()
    y = tgn.normalize_sync(xd)
    y.backward(distribute_tensor(dy, mesh, [Shard(-1)]))
    if not all([same(y, ref[0]), same(xd.grad, ref[1])]):
        failed.append("Shard(-1) without a weight")
    if world == 4:  # a 2-D mesh: rows over one mesh dim, the hidden dim over the other
        failed += check_2d_mesh()
    errors = []
    for bad in (lambda: tgn.normalize_sync(distribute_tensor(x, mesh, [Shard(0)]), torch.ones(5)),
                lambda: tgn.normalize_sync(distribute_tensor(x, mesh, [Shard(0)]), w, out=torch.empty(3, 4, 6)),
                lambda: tgn.normalize_sync(x, distribute_tensor(w, mesh, [Replicate()]))):
        try:
            bad()
            errors.append("no error")
        except (RuntimeError, TypeError) as exc:
            errors.append(type(exc).__name__)
    failed += [f"error case {i}: {e}" for i, e in enumerate(errors) if e == "no error"]
    failed += check_liger(mesh)
    return {"failed": failed, "errors": errors}


def check_2d_mesh() -> list[str]:
    """``[Shard(0), Shard(-1)]`` on a 2 x 2 mesh: the exact module's y, dx and dW."""
    mesh = init_device_mesh("cpu", (2, 2))
    x, dy, w = data(11, (6, 5, 70), torch.float32)
    ref_norm = tgn.RMSNorm(70, weight_grad="exact")
    with torch.no_grad():
        ref_norm.weight.copy_(w)
    ref = one_process(lambda a: ref_norm(a), x, dy)
    norm = tgn.RMSNorm(70, weight_grad="exact")
    norm.weight = nn.Parameter(distribute_tensor(w, mesh, [Replicate(), Replicate()]))
    placements = [Shard(0), Shard(-1)]
    xd = distribute_tensor(x, mesh, placements).requires_grad_()
    y = norm(xd)
    y.backward(distribute_tensor(dy, mesh, placements))
    ok = [same(y, ref[0]), same(xd.grad, ref[1]), same(norm.weight.grad, ref_norm.weight.grad)]
    return [] if all(ok) else [f"2-D mesh {placements}: y, dx, dW {ok}"]


def check_liger(mesh: Any) -> list[str]:
    """Liger-Kernel's test_dtensor_rms_norm: ``x`` sharded on the hidden dim, a plain weight,
    llama (offset 0) and gemma (offset 1); here with bits compared, not tolerances."""
    failed = []
    for bs, sl, hd in ((2, 2, 8), (9, 7, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            for offset, casting_mode in ((0.0, "llama"), (1.0, "gemma")):
                g = torch.Generator().manual_seed(bs)
                t = torch.randn(bs, sl, hd, dtype=dtype, generator=g, requires_grad=True)
                dt = distribute_tensor(t, mesh, [Shard(2)])
                w = torch.randn(hd, dtype=dtype, generator=g)
                w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
                y1 = tgn.normalize_sync(dt, w1, 1e-6, offset=offset, casting_mode=casting_mode)
                y2 = tgn.normalize_sync(t, w2, 1e-6, offset=offset, casting_mode=casting_mode)
                grad = torch.randn(y2.shape, dtype=y2.dtype, generator=g)
                y1.backward(distribute_tensor(grad, mesh, [Shard(2)]))
                y2.backward(grad)
                tag = f"liger {bs, sl, hd} {dtype} {casting_mode}"
                if not all([same(y1, y2), same(w1.grad, w2.grad), same(dt.grad, t.grad)]):
                    failed.append(tag)
    return failed


class Block(nn.Module):
    """A residual block with a tgn norm, as a decoder layer's pieces."""

    def __init__(self, dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.proj = norm, nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))  # type: ignore[no-any-return]


def check_all(rank: int, world: int) -> dict[str, Any]:
    """The faces, the modules, SequenceParallel and the ops, in one spawn."""
    faces, modules, sp = check_faces(rank, world), check_modules(rank, world), check_sequence_parallel(rank, world)
    failed = faces["failed"] + modules["failed"] + sp["failed"] + check_ops(rank, world)["failed"]
    return {"failed": failed, "found": faces["found"],
            "errors": modules["errors"]}


def check_sequence_parallel(rank: int, world: int) -> dict[str, Any]:
    """``SequenceParallel`` on tgn.RMSNorm (float and exact dW) and tgn.LayerNorm."""
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    x, dy, w = data(5, (2, 12, 24), torch.float32)  # SequenceParallel assumes even shards
    for name, make in (("rms", lambda: tgn.RMSNorm(24)), ("rms exact", lambda: tgn.RMSNorm(24, weight_grad="exact")),
                       ("layer", lambda: tgn.LayerNorm(24))):
        ref, sp = make(), make()
        with torch.no_grad():
            ref.weight.copy_(w)
            sp.weight.copy_(w)
        parallelize_module(sp, mesh, SequenceParallel())
        ref_out = one_process(lambda a: ref(a), x, dy)
        local = x.tensor_split(world, dim=1)[rank].clone().requires_grad_()
        y = sp(local)  # SequenceParallel: the local sequence shard in, a Shard(1) DTensor out
        y.backward(distribute_tensor(dy, mesh, [Shard(1)]))
        if not isinstance(y, DTensor) or not same(y, ref_out[0]):
            failed.append(f"{name}: y")
        if not same(local.grad, ref_out[1].tensor_split(world, dim=1)[rank]):
            failed.append(f"{name}: dx")
        g = sp.weight.grad
        if name == "rms exact":
            if tuple(g.placements) != (Replicate(),) or not same(g, ref.weight.grad):
                failed.append(f"{name}: dW {g.placements}")
        elif not torch.allclose(g.full_tensor(), ref.weight.grad, rtol=1e-5, atol=1e-6):
            failed.append(f"{name}: dW not close")
    return {"failed": failed}


def check_fsdp2(rank: int, world: int, steps: int) -> dict[str, Any]:
    """A small model wrapped with FSDP2 trains with tgn norms; with the exact norm weights
    kept out of FSDP and reduced by all_reduce_exact_grads, their gradient has the
    one-process bits of every rank's rows."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), Block(32, tgn.RMSNorm(32)), tgn.RMSNorm(32, weight_grad="exact"))
    ref = nn.Sequential(nn.Linear(16, 32), Block(32, tgn.RMSNorm(32)), tgn.RMSNorm(32, weight_grad="exact"))
    ref.load_state_dict(model.state_dict())
    exact_weight = model[2].weight
    fully_shard(model[1])
    fully_shard(model, ignored_params={exact_weight})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    seen: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    losses, failed = [], []
    target = torch.linspace(-1, 1, 32)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        batch = torch.randn(world, 6, 16, generator=g)
        loss = (model(batch[rank]) * target).sum()
        loss.backward()
        tgn.distributed.all_reduce_exact_grads(model[2])
        # the exact weight's gradient: the one-process exact dW over every rank's norm input
        rows = [torch.empty_like(seen[-1]) for _ in range(world)]
        torch.distributed.all_gather(rows, seen[-1])
        check = tgn.RMSNorm(32, weight_grad="exact")
        with torch.no_grad():
            check.weight.copy_(exact_weight)
        check(torch.cat(rows)).backward(target.expand(world * 6, 32))
        if not same(exact_weight.grad, check.weight.grad):
            failed.append(f"step {step}: exact dW")
        with torch.no_grad():
            exact_weight.grad.div_(world)  # FSDP2 averages the others over the ranks
        opt.step()
        opt.zero_grad()
        ref_loss = (ref(batch.reshape(world * 6, 16)) * target).sum() / world
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        total = loss.detach() / world
        torch.distributed.all_reduce(total)
        losses.append((float(total), float(ref_loss.detach())))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if not torch.allclose(full.detach(), q.detach(), rtol=1e-4, atol=1e-5):
            failed.append(f"parameter {name} after {steps} steps")
    return {"failed": failed, "losses": losses}


def check_ops(rank: int, world: int) -> dict[str, Any]:
    """The torch.library ops handed DTensors directly (DTensor's dispatch and our rules):
    rows sharded keep their placement, the hidden dim is gathered first; the bits are
    the one-process op's."""
    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    x, dy, w = data(8, (12, 12, 40), torch.float32)  # rows for every rank (DTensor's choice)
    config = (1e-6, 16, "tree", "pairwise", "float", "torch", 0.0)

    def rms(a: Any, b: Any) -> Any:
        return torch.ops.taskgraph_norm.rms_norm(a, b, *config)[0]

    def layer(a: Any, b: Any) -> Any:
        return torch.ops.taskgraph_norm.layer_norm(a, b, None, 1e-5, 16, "tree", "pairwise", "float")[0]

    for name, call in (("rms_norm", rms), ("layer_norm", layer)):
        ref = one_process(call, x, dy, w)
        for pname, placement in PLACEMENTS.items():
            y, dx, dw = _dtensor_run(mesh, placement, call, x, dy, w, "dtensor")
            if not all([same(y, ref[0]), same(dx, ref[1])]):
                failed.append(f"{name} {pname}: y or dx")
            rows = pname in ("Shard(0)", "Shard(1)")
            if rows != dw.placements[0].is_partial():
                failed.append(f"{name} {pname}: dW {dw.placements}")
            if not torch.allclose(dw.full_tensor(), ref[2], rtol=1e-5, atol=1e-6):
                failed.append(f"{name} {pname}: dW not close")
    return {"failed": failed}
