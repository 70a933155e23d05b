"""ISR pooling kinds (avg, max, overlap, merge): explicit reference computations on one EFA module,
grids, the 50% merge limit, token merging against a loop reference, and whole-model switching."""
import math

import pytest
import torch
import torch.nn.functional as F

import edaformer
from edaformer.models import efa, reduction


def _explicit_efa(attn: efa.EFA, x: torch.Tensor, h: int, w: int, pooled_map: torch.Tensor,
                  merge: bool = False) -> torch.Tensor:
    """EFA computed by hand from a given pooled key/value map ``(B, C, h', w')``."""
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    kv = attn.sr(pooled_map).flatten(2).transpose(1, 2)
    if attn.norm is not None:
        kv = attn.act(attn.norm(kv))
    if merge:
        kv = reduction.merge_tokens(kv)
    q = x.reshape(b, n, heads, d).transpose(1, 2)
    k = kv.reshape(b, -1, heads, d).transpose(1, 2)
    weights = (q @ k.transpose(-2, -1) * d ** -0.5).softmax(-1)
    return attn.proj((weights @ k).transpose(1, 2).reshape(b, n, c))


def _module(kv_norm: bool = True, train_ratio: int = 2) -> efa.EFA:
    torch.manual_seed(0)
    return efa.EFA(8, 2, train_ratio=train_ratio, kv_norm=kv_norm).eval()


def _token_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


@pytest.mark.parametrize("hw", [(12, 20), (13, 22)])
def test_max_pool_equals_explicit_max_pool2d(hw):
    h, w = hw
    attn = _module()
    attn.set_isr(2, "max")
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _explicit_efa(attn, x, h, w, F.max_pool2d(_token_map(x, h, w), 4, 4))
        torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-6)
        attn.set_isr(2, "avg")
        assert not torch.allclose(attn(x, h, w), expected)
    assert attn.pooled_hw(h, w) == (h // 4, w // 4)


@pytest.mark.parametrize("hw", [(12, 20), (13, 23)])
def test_overlap_pool_equals_explicit_avg_pool2d(hw):
    h, w = hw
    attn = _module()
    attn.set_isr(2, "overlap")  # ratio 4: kernel 8, stride 4, padding 2
    assert reduction.overlap_geometry(4) == (8, 4, 2)
    x = torch.randn(1, h * w, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled = F.avg_pool2d(_token_map(x, h, w), 8, 4, 2, count_include_pad=False)
        assert pooled.shape[-2:] == (h // 4, w // 4)
        torch.testing.assert_close(attn(x, h, w), _explicit_efa(attn, x, h, w, pooled), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [2, 3, 4, 6, 8, 16])
def test_overlap_grid_is_the_floor_grid(ratio):
    kernel, stride, padding = reduction.overlap_geometry(ratio)
    assert stride == ratio and kernel == ratio + 2 * (ratio // 2) and kernel > ratio
    for n in range(ratio, 5 * ratio + 3):
        x = torch.zeros(1, 1, n, ratio)
        out = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=False)
        assert out.shape[-2] == n // ratio, (ratio, n)


def test_factor_one_is_the_training_pooling_for_every_kind():
    attn = _module()
    x = torch.randn(1, 12 * 16, 8)
    with torch.no_grad():
        reference = attn(x, 12, 16)
        for pool in reduction.ISR_POOLS:
            attn.set_isr(1, pool)
            assert attn.pool_ratio == 2
            assert torch.equal(attn(x, 12, 16), reference), pool


def test_merge_halves_the_pooled_tokens_with_ceil():
    attn = _module()
    attn.set_isr(2, "merge")
    assert attn.pool_ratio == 2  # pools at the training ratio, then merges
    for h, w in [(12, 16), (10, 14)]:  # pooled grids 6x8 (48 tokens) and 5x7 (35 tokens)
        n = (h // 2) * (w // 2)
        step = attn.kv_reduction(h, w)
        assert step.merged and step.pooled_hw == (h // 2, w // 2)
        assert step.tokens == math.ceil(n / 2) == n - n // 2
        x = torch.randn(2, h * w, 8)
        with torch.no_grad():
            kv = attn.keys_values(x, h, w)
            assert kv.shape == (2, math.ceil(n / 2), 8)
            pooled = F.avg_pool2d(_token_map(x, h, w), 2, 2)
            torch.testing.assert_close(attn(x, h, w), _explicit_efa(attn, x, h, w, pooled, merge=True),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [3, 4])
def test_merge_factor_above_two_is_rejected_with_the_reason(factor):
    attn = _module()
    with pytest.raises(ValueError, match=rf"ISR factor {factor} is not possible with pool 'merge': one bipartite "
                                         r"merging step removes at most half of the key/value tokens"):
        attn.set_isr(factor, "merge")
    assert attn.isr_factor == 1 and attn.pool == "avg"


def _merge_loop_reference(x: torch.Tensor) -> torch.Tensor:
    """One bipartite matching step written with Python loops (one image)."""
    n = x.shape[0]
    if n < 2:
        return x
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    sim = [[F.cosine_similarity(x[i], x[j], dim=0).item() for j in b_idx] for i in a_idx]
    best = [max(range(len(b_idx)), key=lambda j, row=row: (row[j], -j)) for row in sim]
    score = [sim[i][best[i]] for i in range(len(a_idx))]
    order = sorted(range(len(a_idx)), key=lambda i: (-score[i], i))
    r = n // 2
    groups = {j: [x[b_idx[j]]] for j in range(len(b_idx))}
    for i in order[:r]:
        groups[best[i]].append(x[a_idx[i]])
    kept = [x[a_idx[i]] for i in order[r:]]
    return torch.stack(kept + [torch.stack(groups[j]).mean(0) for j in range(len(b_idx))])


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33])
def test_merge_tokens_equals_loop_reference(n):
    x = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    out = reduction.merge_tokens(x)
    assert out.shape == (3, n - n // 2, 6)
    for i in range(3):
        torch.testing.assert_close(out[i], _merge_loop_reference(x[i]))
    assert torch.equal(out, reduction.merge_tokens(x.clone()))  # deterministic


def test_merge_of_equal_tokens_keeps_them():
    torch.testing.assert_close(reduction.merge_tokens(torch.ones(1, 9, 4)), torch.ones(1, 5, 4))


def test_merge_flops_formula():
    # n = 35: |A| = 18, |B| = 17, r = 17
    assert reduction.merge_flops(35, 8) == 8 * (35 + 18 * 17 + 17)
    assert reduction.merge_flops(1, 8) == 8


def test_unknown_pool():
    with pytest.raises(ValueError, match="unknown ISR pool 'median'; choose one of avg, max, overlap, merge"):
        _module().set_isr(2, "median")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k", num_classes=5).eval()


@pytest.mark.parametrize("pool", reduction.ISR_POOLS)
def test_model_runs_every_pool(tiny, pool):
    x = torch.randn(1, 3, 96, 128)
    try:
        tiny.set_isr("2211-222", pool=pool)
        assert tiny.isr_pool == pool and str(tiny.isr) == "2211-222"
        assert all(m.pool == pool for _, m in tiny.attention_layers())
        with torch.no_grad():
            assert tiny(x).shape == (1, 5, 96, 128)
    finally:
        tiny.set_isr("1111-111")
    assert tiny.isr_pool == "avg"


def test_model_merge_ratios_and_min_size(tiny):
    try:
        tiny.set_isr("2211-222", pool="merge")
        # merge pools at the training ratios; the factors only merge
        assert tiny.pool_ratios() == {"encoder.stage1": 8, "encoder.stage2": 4, "encoder.stage3": 2,
                                      "encoder.stage4": 1, "decoder.c2": 4, "decoder.c3": 2, "decoder.c4": 1}
        assert tiny.min_input_size() == edaformer.create_model("edaformer-t-ade20k").min_input_size()
        tiny.set_isr("2211-222", pool="overlap")
        assert tiny.pool_ratios()["encoder.stage1"] == 16
    finally:
        tiny.set_isr("1111-111")


def test_model_rejects_merge_factor_three_and_keeps_its_setting(tiny):
    tiny.set_isr("2211-222", pool="max")
    try:
        with pytest.raises(ValueError, match=r"decoder c4: ISR factor 3 is not possible with pool 'merge'"):
            tiny.set_isr("2211-223", pool="merge")
        with pytest.raises(ValueError, match="unknown ISR pool"):
            tiny.set_isr("2211-222", pool="mean")
        assert str(tiny.isr) == "2211-222" and tiny.isr_pool == "max"
        assert {m.pool for _, m in tiny.attention_layers()} == {"max"}
        assert tiny.pool_ratios()["decoder.c4"] == 2
    finally:
        tiny.set_isr("1111-111")


def test_create_model_with_isr_pool():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3, isr="1111-222", isr_pool="merge")
    assert model.isr_pool == "merge" and str(model.isr) == "1111-222"


def test_merge_runs_under_cpu_bf16_autocast(tiny):
    x = torch.randn(1, 3, 64, 64)
    with edaformer.isr(tiny, "2211-222"):
        tiny.set_isr("2211-222", pool="merge")
        with torch.inference_mode():
            ref = tiny(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = tiny(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert tiny.isr_pool == "avg"


def test_merge_grid_error_names_the_training_ratio():
    attn = _module(train_ratio=4)
    attn.set_isr(2, "merge")
    with pytest.raises(ValueError, match=r"pooling ratio 4 \(train 4, ISR 2 by merging\) does not fit the 3x8"):
        attn.pooled_hw(3, 8)
