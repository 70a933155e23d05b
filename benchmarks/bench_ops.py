"""Component micro-benchmarks: each optimization against the alternative it replaces.

Every pair is timed interleaved in one process (median thread-CPU time and wall time):

* attention: ``F.scaled_dot_product_attention`` on head views (edaformer) vs the reference's
  explicit ``softmax(q @ k^T * scale) @ v`` with the ``transpose(1, 2).reshape`` copy, for every
  EFA layer of the model at the given size (summed over layers);
* key/value pooling: ``F.avg_pool2d`` on the channels-last map vs a reshape-mean (divisible maps);
* the final logits resize: NCHW input (reference) vs channels-last (edaformer's decoder output)
  vs channels-last into a huge-page output buffer (``edaformer.models.fastpath.resize_bilinear``);
* stage hand-off: the reference's ``reshape.permute.contiguous()`` + next patch-embedding conv +
  ``flatten.transpose`` + LayerNorm, vs edaformer's views.

    python benchmarks/bench_ops.py --size 512x512 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.models import efa, fastpath  # noqa: E402

import harness  # noqa: E402


def interleave(fns: dict, runs: int) -> dict[str, tuple[float, float]]:
    """Median (thread CPU ms, wall ms) per callable, round-robin after one warm-up call each."""
    for f in fns.values():
        f()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    names = list(fns)
    for i in range(runs):
        for k in names if i % 2 == 0 else names[::-1]:
            c0, t0 = time.thread_time(), time.perf_counter()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.thread_time() - c0)
    return {k: (1e3 * statistics.median(cpu[k]), 1e3 * statistics.median(wall[k])) for k in names}


def attention_shapes(model, size) -> collections.Counter:
    """(heads, Nq, Nkv, d) of every EFA call of ``model`` at ``size`` (batch-free)."""
    shapes = collections.Counter()
    h, w = size
    grids = []
    for i, stage in enumerate(model.encoder.stages):
        k, s = (7, 4) if i == 0 else (3, 2)
        h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        grids.append((h, w))
        for blk in stage.blocks:
            shapes[_shape(blk.attn, h, w)] += 1
    for (h, w), blocks in zip(grids[1:], model.decoder.levels()):
        for blk in blocks:
            shapes[_shape(blk.attn, h, w)] += 1
    return shapes


def _shape(attn, h, w):
    kh, kw = attn.pooled_hw(h, w)
    c = attn.proj.in_features
    return attn.num_heads, h * w, kh * kw, c // attn.num_heads


def bench_attention(model, size, batch, runs) -> list[dict]:
    rows = []
    for (heads, nq, nkv, d), count in sorted(attention_shapes(model, size).items(), key=lambda kv: -kv[0][1]):
        c = heads * d
        x = torch.randn(batch, nq, c)
        kv_t = torch.randn(batch, nkv, c)
        scale = d ** -0.5

        def sdpa():
            q = x.view(batch, nq, heads, d).transpose(1, 2)
            kv = kv_t.view(batch, nkv, heads, d).transpose(1, 2)
            return F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).reshape(batch, nq, c)

        def explicit():
            q = x.reshape(batch, nq, heads, d).permute(0, 2, 1, 3)
            k = kv_t.reshape(batch, -1, heads, d).permute(0, 2, 1, 3)
            attn = (q @ k.transpose(-2, -1)) * scale
            attn = attn.softmax(dim=-1)
            return (attn @ k).transpose(1, 2).reshape(batch, nq, c)

        with torch.inference_mode():
            err = (sdpa() - explicit()).abs().max().item()
            t = interleave({"sdpa": sdpa, "explicit": explicit}, runs)
        rows.append(dict(shape=f"h={heads} Nq={nq} Nkv={nkv} d={d}", layers=count,
                         sdpa_ms=t["sdpa"][0] * count, explicit_ms=t["explicit"][0] * count,
                         ratio=t["sdpa"][0] / t["explicit"][0],
                         explicit_matrix_mb=2 * batch * heads * nq * nkv * 4 / 2**20, max_abs_diff=err))
    return rows


def bench_pool(size, runs) -> list[dict]:
    rows = []
    h, w = size[0] // 4, size[1] // 4
    for c, hh, ww, r in [(32, h, w, 8), (32, h, w, 16), (64, h // 2, w // 2, 4), (64, h // 2, w // 2, 8)]:
        if hh % r or ww % r:
            continue
        t = torch.randn(1, hh * ww, c)
        m = efa.to_map(t, hh, ww)

        def pool():
            return efa.to_tokens(F.avg_pool2d(m, r, r))

        def mean():
            return t.view(1, hh // r, r, ww // r, r, c).mean((2, 4)).flatten(1, 2)

        with torch.inference_mode():
            err = (pool() - mean()).abs().max().item()
            res = interleave({"avg_pool2d": pool, "reshape_mean": mean}, runs)
        rows.append(dict(map=f"{c}x{hh}x{ww}", ratio_r=r, avg_pool2d_ms=res["avg_pool2d"][0],
                         reshape_mean_ms=res["reshape_mean"][0], max_abs_diff=err))
    return rows


def bench_resize(size, classes, runs) -> list[dict]:
    low = (size[0] // 8, size[1] // 8)
    x = torch.randn(1, classes, *low)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def nchw():
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def cl():
        return F.interpolate(x_cl, size=size, mode="bilinear", align_corners=False)

    def cl_huge():
        with fastpath.options(huge_pages=True, huge_page_min_bytes=0):
            return fastpath.resize_bilinear(x_cl, size)

    with torch.inference_mode():
        assert torch.equal(cl(), cl_huge())
        res = interleave({"nchw": nchw, "channels_last": cl, "channels_last_huge_pages": cl_huge}, runs)
    return [dict(resize=f"{classes}x{low[0]}x{low[1]} -> {size[0]}x{size[1]}", variant=k, cpu_ms=v[0], wall_ms=v[1])
            for k, v in res.items()]


def bench_handoff(size, runs) -> list[dict]:
    """Stage 1 -> stage 2 hand-off (T sizes): output LayerNorm, map, next patch embedding, tokens, LayerNorm."""
    h, w = size[0] // 4, size[1] // 4
    c1, c2 = 32, 64
    t = torch.randn(1, h * w, c1)
    norm1, conv, norm2 = torch.nn.LayerNorm(c1), torch.nn.Conv2d(c1, c2, 3, 2, 1), torch.nn.LayerNorm(c2)

    def reference():
        x = norm1(t).reshape(1, h, w, -1).permute(0, 3, 1, 2).contiguous()
        y = conv(x)
        return norm2(y.flatten(2).transpose(1, 2))

    def ours():
        x = efa.to_map(norm1(t), h, w)
        return norm2(efa.to_tokens(conv(x)))

    with torch.inference_mode():
        err = (reference() - ours()).abs().max().item()
        res = interleave({"reference": reference, "views": ours}, runs)
    return [dict(handoff=f"stage1 {c1}x{h}x{w} -> stage2", variant=k, cpu_ms=v[0], wall_ms=v[1], max_abs_diff=err)
            for k, v in res.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: edaformer-t-ade20k at 512x512, -cityscapes otherwise")
    p.add_argument("--size", default="512x512")
    p.add_argument("--isr", default="1111-111")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w or h))
    name = args.model or ("edaformer-t-ade20k" if size == (512, 512) else "edaformer-t-cityscapes")
    model = harness.build_named(name, isr=args.isr)
    env = bm.environment()
    print(f"{name} {size[0]}x{size[1]} ISR {args.isr}; torch {env['torch']}; {env['cpu']}, {args.threads} thread(s); "
          f"median of {args.runs} interleaved runs; thread CPU ms\n")
    att = bench_attention(model, size, args.batch, args.runs)
    total = dict(shape="all layers", layers=sum(r["layers"] for r in att), sdpa_ms=sum(r["sdpa_ms"] for r in att),
                 explicit_ms=sum(r["explicit_ms"] for r in att),
                 explicit_matrix_mb=max(r["explicit_matrix_mb"] for r in att))
    total["ratio"] = total["sdpa_ms"] / total["explicit_ms"]
    print("### attention (summed over the layers of each shape)\n")
    print(bm.format_table(att + [total], [("shape", "shape", ""), ("layers", "layers", ""),
                                          ("sdpa_ms", "SDPA ms", ".1f"), ("explicit_ms", "explicit ms", ".1f"),
                                          ("ratio", "ratio", ".2f"), ("explicit_matrix_mb", "explicit scores MB", ".0f"),
                                          ("max_abs_diff", "max abs diff", ".1e")]))
    print("\n### key/value pooling\n")
    print(bm.format_table(bench_pool(size, args.runs), [
        ("map", "map C x H x W", ""), ("ratio_r", "r", ""), ("avg_pool2d_ms", "avg_pool2d ms", ".3f"),
        ("reshape_mean_ms", "reshape-mean ms", ".3f"), ("max_abs_diff", "max abs diff", ".1e")]))
    print("\n### final logits resize\n")
    print(bm.format_table(bench_resize(size, model.num_classes, args.runs), [
        ("resize", "resize", ""), ("variant", "variant", ""), ("cpu_ms", "CPU ms", ".1f"), ("wall_ms", "wall ms", ".1f")]))
    print("\n### stage hand-off\n")
    print(bm.format_table(bench_handoff(size, args.runs), [
        ("handoff", "hand-off", ""), ("variant", "variant", ""), ("cpu_ms", "CPU ms", ".2f"),
        ("wall_ms", "wall ms", ".2f"), ("max_abs_diff", "max abs diff", ".1e")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
