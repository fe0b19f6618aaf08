"""Rank functions for tests/test_dtensor.py's LayerNorm-on-the-hidden-dim and gated
cases, run in spawned processes by ``run_local`` (the helpers are
:mod:`tests._dtensor_workers`'): each rank compares what the DTensor path gives with
the one-process result on the full tensors, bit for bit, and returns the names of the
checks that failed, the errors raised and the negative controls' findings.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import taskgraph_norm as tgn

from ._dtensor_workers import PLACEMENTS, data, one_process, same


def _naive_layer_norm(x_local: torch.Tensor, hidden: int, eps: float) -> torch.Tensor:
    """A LayerNorm over a sharded hidden dim as one would write it with float all-reduces
    (the negative control: its bits depend on the shards)."""
    total = x_local.float().sum(-1, keepdim=True)
    dist.all_reduce(total)
    d = x_local.float() - total / hidden
    sq = (d * d).sum(-1, keepdim=True)
    dist.all_reduce(sq)
    return (d / torch.sqrt(sq / hidden + eps)).to(x_local.dtype)


def check_layer_hidden(rank: int, world: int) -> dict[str, Any]:
    """LayerNorm of a DTensor sharded on the hidden dim: y, dx, dW and db, every option."""
    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    found: dict[str, bool] = {}
    cases = [((3, 5, 97), torch.float32), ((3, 5, 97), torch.bfloat16), ((2, 4, 64), torch.float16),
             ((2, 1500, 67), torch.float32)]
    for n, (shape, dtype) in enumerate(cases):
        x, dy, w = data(20 + n, shape, dtype)
        b = w - 1
        for accumulate in ("float", "exact") if n < 3 else ("float",):
            def layer(a: Any, c: Any, d: Any) -> Any:
                return tgn.layer_norm_sync(a, c, d, accumulate=accumulate, chunk_size=16)
            ref = one_process(layer, x, dy, w, b)
            for kind in ("dtensor", "plain"):
                tag = f"layer Shard(-1) {shape} {dtype} {accumulate} {kind}"
                xd = distribute_tensor(x, mesh, [Shard(-1)]).requires_grad_()
                params = [distribute_tensor(p, mesh, [Replicate()]) if kind == "dtensor" else p.clone()
                          for p in (w, b)]
                wd, bd = (p.requires_grad_() for p in params)
                y = layer(xd, wd, bd)
                y.backward(distribute_tensor(dy, mesh, [Shard(-1)]))
                if not isinstance(y, DTensor) or y.placements != (Shard(2),):
                    failed.append(f"{tag}: placements {getattr(y, 'placements', type(y))}")
                got = [y, xd.grad, wd.grad, bd.grad]
                if kind == "dtensor" and (wd.grad.placements, bd.grad.placements) != ((Replicate(),),) * 2:
                    failed.append(f"{tag}: dW, db placements {wd.grad.placements}, {bd.grad.placements}")
                for name, a, r in zip(("y", "dx", "dW", "db"), got, ref):
                    if not same(a, r):
                        failed.append(f"{tag}: {name}")
        if n == 0 and world > 1:  # negative control: float all-reduces of the shards' sums
            naive = _naive_layer_norm(distribute_tensor(x, mesh, [Shard(-1)]).to_local(), shape[-1], 1e-5)
            whole = DTensor.from_local(naive, mesh, [Shard(2)], run_check=False, shape=x.shape,
                                       stride=x.stride()).full_tensor()
            found["naive layer"] = not same(whole, tgn.layer_norm_sync(x))
    # the module, no weight, no gradient recorded, the async face and the residual
    x, dy, w = data(30, (3, 4, 50), torch.float32)
    module = tgn.LayerNorm(50, accumulate="exact")
    xd = distribute_tensor(x, mesh, [Shard(-1)])
    r = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1))
    y, h = tgn.layer_norm_sync(xd, w, residual=distribute_tensor(r, mesh, [Shard(-1)]))
    with torch.no_grad():
        y_no_grad = tgn.layer_norm_sync(xd, None)
    with torch.inference_mode():
        y_inference = module(xd)
    checks = {"module": same(module(xd), module(x)), "no weight, no_grad": same(y_no_grad, tgn.layer_norm_sync(x)),
              "inference_mode": same(y_inference, module(x)),
              "async": same(anyio.run(functools.partial(tgn.layer_norm, xd, w)), tgn.layer_norm_sync(x, w)),
              "residual": same(y, tgn.layer_norm_sync(x + r, w)) and same(h, x + r)}
    failed += [f"layer Shard(-1) {name}" for name, ok in checks.items() if not ok]
    errors = []
    for bad in (lambda: tgn.LayerNorm((4, 50))(distribute_tensor(x, mesh, [Shard(-1)])),
                lambda: tgn.layer_norm_sync(xd, torch.ones(7))):
        try:
            bad()
            errors.append("no error")
        except (NotImplementedError, RuntimeError) as exc:
            errors.append(type(exc).__name__)
    return {"failed": failed, "found": found, "errors": errors}


def _gated_run(mesh: Any, placement: Any, x: torch.Tensor, z: torch.Tensor, dy: torch.Tensor, w: torch.Tensor,
               options: dict[str, Any]) -> list[Any]:
    xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
    zd = distribute_tensor(z, mesh, [placement]).requires_grad_()
    wd = distribute_tensor(w, mesh, [Replicate()]).requires_grad_()
    y = tgn.normalize_sync(xd, wd, gate=zd, **options)
    y.backward(distribute_tensor(dy, mesh, [placement]))
    return [y, xd.grad, zd.grad, wd.grad]


def check_gated(rank: int, world: int) -> dict[str, Any]:
    """Gated, grouped RMSNorm of DTensors: rows sharded, replicated, and the hidden dim
    sharded in whole groups: y, dx, dgate, dW; the exact module; the refusals."""
    mesh = init_device_mesh("cpu", (world,))
    failed: list[str] = []
    found: dict[str, bool] = {}
    for n, (shape, dtype) in enumerate([((4, 6, 96), torch.float32), ((4, 6, 96), torch.bfloat16),
                                        ((2, 1500, 96), torch.float32)]):
        x, dy, w = data(40 + n, shape, dtype)
        z = data(50 + n, shape, dtype)[0] / 512
        for before, casting_mode in ((False, "torch"), (True, "llama")) if n < 2 else ((False, "llama"),):
            options = dict(group_size=8, norm_before_gate=before, casting_mode=casting_mode, chunk_size=4)
            ref = one_process(lambda a, c, d: tgn.normalize_sync(a, d, gate=c, **options), x, dy, z, w)
            for pname, placement in PLACEMENTS.items():
                tag = f"gated {shape} {dtype} before={before} {casting_mode} {pname}"
                got = _gated_run(mesh, placement, x, z, dy, w, options)
                if not isinstance(got[0], DTensor) or got[0].placements != got[1].placements:
                    failed.append(f"{tag}: placements")
                failed += [f"{tag}: {name}" for name, a, r in zip(("y", "dx", "dgate"), got, ref) if not same(a, r)]
                if pname in ("Shard(0)", "Shard(1)") and world > 1:  # a float reduction over ranks
                    found[tag] = not same(got[3], ref[3])
                    scale = float(ref[3].float().abs().max())
                    if not torch.allclose(got[3].full_tensor().float(), ref[3].float(), rtol=2e-2, atol=2e-2 * scale):
                        failed.append(f"{tag}: dW not close")
                elif not same(got[3], ref[3]):
                    failed.append(f"{tag}: dW")
    if world > 1:  # negative control: a hidden shard normalised as one row, not in its groups
        x, _, w = data(45, (4, 6, 96), torch.float32)
        xh = distribute_tensor(x, mesh, [Shard(-1)]).to_local()
        whole = DTensor.from_local(tgn.normalize_sync(xh, w.chunk(world)[rank]), mesh, [Shard(2)]).full_tensor()
        found["a shard as one row"] = not same(whole, tgn.normalize_sync(x, w, group_size=8))
    failed += _gated_module(mesh)
    return {"failed": failed, "found": found, "errors": _gated_errors(mesh, world)}


def _gated_module(mesh: Any) -> list[str]:
    """tgn.GatedRMSNorm(weight_grad="exact") with a DTensor weight: the one-process bits
    of y, dx, dgate and dW for every placement; the async face with a gate."""
    failed = []
    for dtype in (torch.float32, torch.bfloat16):
        x, dy, w = data(60, (3, 8, 96), dtype)
        z = data(61, (3, 8, 96), dtype)[0] / 512
        ref_norm = tgn.GatedRMSNorm(96, group_size=8, weight_grad="exact", dtype=dtype)
        with torch.no_grad():
            ref_norm.weight.copy_(w)
        ref = one_process(lambda a, c: ref_norm(a, c), x, dy, z)
        for pname, placement in PLACEMENTS.items():
            norm = tgn.GatedRMSNorm(96, group_size=8, weight_grad="exact", dtype=dtype)
            norm.weight = nn.Parameter(distribute_tensor(w, mesh, [Replicate()]))
            xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
            zd = distribute_tensor(z, mesh, [placement]).requires_grad_()
            y = norm(xd, zd)
            y.backward(distribute_tensor(dy, mesh, [placement]))
            if not all([same(y, ref[0]), same(xd.grad, ref[1]), same(zd.grad, ref[2])]):
                failed.append(f"exact gated module {dtype} {pname}: y, dx or dgate")
            g = norm.weight.grad
            rows = pname in ("Shard(0)", "Shard(1)")
            if not isinstance(g, DTensor) or (rows and tuple(g.placements) != (Replicate(),)) or not same(
                    g, ref_norm.weight.grad):
                failed.append(f"exact gated module {dtype} {pname}: dW {getattr(g, 'placements', None)}")
    x, _, w = data(62, (5, 96), torch.float16)  # fp16, no gradient recorded, the float module
    z = data(63, (5, 96), torch.float16)[0] / 512
    norm = tgn.GatedRMSNorm(96, group_size=8, norm_before_gate=True, dtype=torch.float16)
    with torch.no_grad():
        norm.weight.copy_(w)
        ref_y = norm(x, z)
    for pname in ("Shard(0)", "Shard(-1)", "Replicate"):
        xd, zd = distribute_tensor(x, mesh, [PLACEMENTS[pname]]), distribute_tensor(z, mesh, [PLACEMENTS[pname]])
        with torch.no_grad():
            y_no_grad = norm(xd, zd)
        with torch.inference_mode():
            y_inference = norm(xd, zd)
        if not all([same(y_no_grad, ref_y), same(y_inference, ref_y), same(norm(xd, zd), ref_y)]):
            failed.append(f"fp16 gated module {pname}: no_grad, inference_mode or grad")
    failed += _prepare_module_input(mesh)
    xd, zd = distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(z, mesh, [Shard(0)])
    y_async = anyio.run(functools.partial(tgn.normalize, xd, w, gate=zd, group_size=8))
    if not same(y_async, tgn.normalize_sync(x, w, gate=z, group_size=8)):
        failed.append("async gated face")
    return failed


def _prepare_module_input(mesh: Any) -> list[str]:
    """Sequence parallel for a gated module: ``PrepareModuleInput`` makes both local
    sequence shards DTensors (torch's ``SequenceParallel`` hands a module its first
    input only)."""
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    world, rank = mesh.size(), mesh.get_local_rank()
    x, dy, w = data(64, (2, 12, 96), torch.float32)  # 12: even sequence shards for 1 to 4 ranks
    z = data(65, (2, 12, 96), torch.float32)[0] / 512
    ref_norm = tgn.GatedRMSNorm(96, group_size=8, norm_before_gate=True)
    ref = one_process(lambda a, c: ref_norm(a, c), x, dy, z)
    norm = tgn.GatedRMSNorm(96, group_size=8, norm_before_gate=True)
    layouts = (Shard(1), Shard(1))
    parallelize_module(norm, mesh, PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts))
    xl, zl = (t.tensor_split(world, dim=1)[rank].clone().requires_grad_() for t in (x, z))
    y = norm(xl, zl)
    y.backward(distribute_tensor(dy, mesh, [Shard(1)]))
    ok = [isinstance(y, DTensor) and same(y, ref[0]), same(xl.grad, ref[1].tensor_split(world, dim=1)[rank]),
          same(zl.grad, ref[2].tensor_split(world, dim=1)[rank])]
    return [] if all(ok) else [f"PrepareModuleInput gated module: y, dx, dgate {ok}"]


def check_2d_mesh() -> list[str]:
    """``[Shard(0), Shard(-1)]`` on a 2 x 2 mesh: LayerNorm (y, dx; dW and db summed over
    the row group in float) and the exact gated module (y, dx, dgate, dW)."""
    mesh = init_device_mesh("cpu", (2, 2))
    placements = [Shard(0), Shard(-1)]
    failed = []
    x, dy, w = data(80, (6, 5, 96), torch.float32)
    z = data(81, (6, 5, 96), torch.float32)[0] / 512
    ref = one_process(lambda a, c, d: tgn.layer_norm_sync(a, c, d), x, dy, w, w - 1)
    xd = distribute_tensor(x, mesh, placements).requires_grad_()
    wd, bd = (distribute_tensor(p, mesh, [Replicate(), Replicate()]).requires_grad_() for p in (w, w - 1))
    y = tgn.layer_norm_sync(xd, wd, bd)
    y.backward(distribute_tensor(dy, mesh, placements))
    close = all(torch.allclose(g.full_tensor(), r, rtol=1e-4, atol=1e-4) for g, r in ((wd.grad, ref[2]),
                                                                                        (bd.grad, ref[3])))
    if not all([same(y, ref[0]), same(xd.grad, ref[1]), close]):
        failed.append(f"2-D mesh LayerNorm {placements}")
    ref_norm = tgn.GatedRMSNorm(96, group_size=8, weight_grad="exact")
    ref = one_process(lambda a, c: ref_norm(a, c), x, dy, z)
    norm = tgn.GatedRMSNorm(96, group_size=8, weight_grad="exact")
    norm.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate(), Replicate()]))
    xd, zd = (distribute_tensor(t, mesh, placements).requires_grad_() for t in (x, z))
    y = norm(xd, zd)
    y.backward(distribute_tensor(dy, mesh, placements))
    ok = [same(y, ref[0]), same(xd.grad, ref[1]), same(zd.grad, ref[2]), same(norm.weight.grad, ref_norm.weight.grad)]
    return failed + ([] if all(ok) else [f"2-D mesh exact gated module {placements}: y, dx, dgate, dW {ok}"])


def _gated_errors(mesh: Any, world: int) -> list[str]:
    x, _, w = data(70, (2, 3, 96), torch.float32)
    xs, xh = distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(x, mesh, [Shard(-1)])
    cases = [lambda: tgn.normalize_sync(xs, w, gate=x),  # a plain gate
             lambda: tgn.normalize_sync(xs, w, gate=distribute_tensor(x, mesh, [Shard(1)])),  # another placement
             lambda: tgn.normalize_sync(xh, w, gate=xh),  # hidden sharded, no groups
             lambda: tgn.normalize_sync(xh, w, gate=xh, group_size=48),  # a group cut when world > 2
             lambda: tgn.normalize_sync(xs, w, gate=xs, out=torch.empty(2, 3, 96))]  # no out= with DTensors
    errors = []
    for bad in cases:
        try:
            bad()
            errors.append("no error")
        except (TypeError, ValueError, NotImplementedError) as exc:
            errors.append(type(exc).__name__)
    return errors


def check_more(rank: int, world: int) -> dict[str, Any]:
    """Both, in one spawn."""
    layer, gated = check_layer_hidden(rank, world), check_gated(rank, world)
    more = check_2d_mesh() if world == 4 else []
    return {"failed": layer["failed"] + gated["failed"] + more, "found": {**layer["found"], **gated["found"]},
            "layer errors": layer["errors"], "gated errors": gated["errors"]}
