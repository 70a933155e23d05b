"""ISR on transformers SegFormer and timm PVTv2 models, and their FLOP count (tiny random models)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import PyramidVisionTransformerV2

import edaformer
from edaformer.flops import count_flops_external
from edaformer.isr import get_isr, set_isr
from edaformer.isr_adapters import set_stage_factors

DIMS, HEADS, DEPTHS = (8, 16, 24, 32), (1, 2, 3, 4), (2, 1, 1, 1)
SR_RATIOS = (8, 4, 2, 1)


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """Weights with std 0.2: the libraries' std-0.02 init makes attention nearly uniform, which
    pooling (it keeps the mean of the tokens) would hardly change."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def segformer(cls_name: str):
    transformers = pytest.importorskip("transformers", reason="SegFormer models need the 'hf' extra (transformers)")
    config = transformers.SegformerConfig(depths=list(DEPTHS), hidden_sizes=list(DIMS),
                                          num_attention_heads=list(HEADS), sr_ratios=list(SR_RATIOS),
                                          mlp_ratios=[2] * 4, decoder_hidden_size=16, num_labels=5)
    return _spread(getattr(transformers, cls_name)(config))


def pvt(linear: bool = False):
    return _spread(PyramidVisionTransformerV2(depths=DEPTHS, embed_dims=DIMS, num_heads=HEADS, sr_ratios=SR_RATIOS,
                                              mlp_ratios=(2,) * 4, num_classes=5, linear=linear))


pytestmark = pytest.mark.usefixtures("one_thread")


BUILDERS = {
    "segformer-semantic-segmentation": lambda: segformer("SegformerForSemanticSegmentation"),
    "segformer-model": lambda: segformer("SegformerModel"),
    "pvt_v2": lambda: pvt(),
    "pvt_v2-linear": lambda: pvt(linear=True),
}


def run(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if hasattr(out, "logits"):
        return out.logits
    return getattr(out, "last_hidden_state", out)


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def test_factor_one_restores_the_model_bit_identically(model):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tree = [(name, type(m)) for name, m in model.named_modules()]
    base = run(model, x)
    own_hooks = hooks(model)  # the library's own (transformers adds some on the first call)
    set_isr(model, "2222")
    assert get_isr(model) == (2, 2, 2, 2)
    assert list(model.state_dict()) == list(state)  # nothing of the ISR machinery is saved
    reduced = run(model, x)
    set_isr(model, "1111")
    again = run(model, x)
    assert reduced.shape == base.shape
    assert (reduced - base).abs().max() > 1e-2 * base.abs().max()
    assert torch.equal(again, base)
    assert get_isr(model) == (1, 1, 1, 1) and hooks(model) == own_hooks
    assert [(name, type(m)) for name, m in model.named_modules()] == tree
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gradients_flow_through_the_pooled_path():
    model = pvt().train()
    set_isr(model, "2221")
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.stages[0].blocks[0].attn.kv.weight.grad.abs().sum() > 0


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _attend(q, k, v, heads: int, proj: torch.nn.Linear) -> torch.Tensor:
    q, k, v = (_split(t, heads) for t in (q, k, v))
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    out = (weights @ v).transpose(1, 2).flatten(2)
    return F.linear(out, proj.weight, proj.bias)


def _grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("stage,hw,factor", [(0, 32, 2), (3, 4, 2)])  # with reduction (sr 8) / without
def test_segformer_attention_matches_explicit_pooling(stage, hw, factor):
    model = segformer("SegformerModel")
    attn = model.stages[stage].blocks[0].attention
    c, heads, sr = DIMS[stage], HEADS[stage], SR_RATIOS[stage]
    x = torch.randn(2, hw * hw, c, generator=torch.Generator().manual_seed(1))
    kv = x
    if sr > 1:
        red = attn.sequence_reduction
        kv = _tokens(F.conv2d(_grid(x, hw, hw), red.sequence_reduction.weight, red.sequence_reduction.bias,
                              stride=sr))
        kv = F.layer_norm(kv, (c,), red.layer_norm.weight, red.layer_norm.bias, red.layer_norm.eps)
    kv = _tokens(F.avg_pool2d(_grid(kv, hw // sr, hw // sr), factor))
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
    k = F.linear(kv, attn.k_proj.weight, attn.k_proj.bias)
    v = F.linear(kv, attn.v_proj.weight, attn.v_proj.bias)
    expected = _attend(q, k, v, heads, attn.o_proj)
    with torch.no_grad():
        untouched = attn(x, hw, hw)[0]
        set_isr(model, [factor if i == stage else 1 for i in range(4)])
        pooled, weights = attn(x, hw, hw)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-4)


@pytest.mark.parametrize("linear", [False, True])
def test_pvt_attention_matches_explicit_pooling(linear):
    model = pvt(linear)
    attn = model.stages[0].blocks[1].attn
    c, heads, hw = DIMS[0], HEADS[0], 32
    x = torch.randn(2, hw * hw, c, generator=torch.Generator().manual_seed(1))
    grid = _grid(x, hw, hw)
    if linear:  # 7x7 adaptive pooling, 1x1 sr, norm, GELU, then the ISR pooling: 7x7 -> 3x3
        grid = F.adaptive_avg_pool2d(grid, 7)
    kv = _tokens(F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=attn.sr.stride))
    kv = F.layer_norm(kv, (c,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    if linear:
        kv = F.gelu(kv)
    side = 7 if linear else hw // SR_RATIOS[0]
    kv = _tokens(F.avg_pool2d(_grid(kv, side, side), 2))
    assert kv.shape[1] == (9 if linear else 4)
    q = F.linear(x, attn.q.weight, attn.q.bias)
    k, v = F.linear(kv, attn.kv.weight, attn.kv.bias).chunk(2, dim=-1)
    expected = _attend(q, k, v, heads, attn.proj)
    with torch.no_grad():
        untouched = attn(x, (hw, hw))
        set_isr(model, "2111")
        pooled = attn(x, (hw, hw))
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-4)


@pytest.mark.parametrize("name,spec,match", [
    ("segformer-semantic-segmentation", "4111",
     r"encoder stage 1: pooling ratio 32 \(train 8 x ISR 4\) does not fit the 16x16 feature map"),
    ("segformer-model", "1114", r"encoder stage 4: pooling ratio 4 \(train 1 x ISR 4\) does not fit the 2x2 feature"),
    ("pvt_v2", "1411", r"encoder stage 2: pooling ratio 16 \(train 4 x ISR 4\) does not fit the 8x8 feature map"),
    ("pvt_v2-linear", "8111", r"encoder stage 1: ISR factor 8 does not fit the 7x7 key/value grid of the linear"),
])
def test_spec_too_large_for_the_map(name, spec, match):
    model = BUILDERS[name]()
    x = torch.randn(1, 3, 64, 64)
    base = run(model, x)
    set_isr(model, spec)
    with pytest.raises(ValueError, match=match):
        run(model, x)
    set_isr(model, "1111")
    assert torch.equal(run(model, x), base)


class SegformerStage(torch.nn.Module):
    """Named like the transformers class, defined elsewhere: not taken for a SegFormer."""


@pytest.mark.parametrize("bad", [torch.nn.Linear(4, 4), torch.nn.Sequential(SegformerStage())])
def test_unsupported_model_raises_type_error(bad):
    with pytest.raises(TypeError, match="not a supported model: ISR works on EDAFormer, transformers SegFormer"):
        set_isr(bad, "2211")
    with pytest.raises(TypeError, match="timm PVTv2"):
        edaformer.isr(bad, "2211").__enter__()
    with pytest.raises(TypeError, match="not a supported model"):
        count_flops_external(bad, (64, 64))


def test_edaformer_counts_flops_elsewhere():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=5)
    with pytest.raises(TypeError, match="use edaformer.count_flops"):
        count_flops_external(model, (64, 64))


@pytest.mark.parametrize("spec,match", [
    ("221", "the encoder needs 4 factors, got 3"),
    ((2, 2, 1, 1, 1), "the encoder needs 4 factors, got 5"),
    ("2211-222", "no decoder part"),
    ("2x11", "expected 4 encoder digits"),
])
def test_bad_spec_raises_value_error_and_changes_nothing(spec, match):
    model = pvt()
    set_isr(model, "2111")
    with pytest.raises(ValueError, match=match):
        set_isr(model, spec)
    assert get_isr(model) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="has 4 encoder stages, got 3 ISR factors"):
        set_stage_factors(model, (2, 2, 1))


def test_isr_context_restores_the_previous_factors():
    model = segformer("SegformerForSemanticSegmentation")
    x = torch.randn(1, 3, 64, 64)
    base = run(model, x)
    set_isr(model, "2111")
    reduced = run(model, x)
    with edaformer.isr(model, "2222") as m:
        assert m is model and get_isr(model) == (2, 2, 2, 2)
        with edaformer.isr(model, [1, 1, 1, 1]):
            assert torch.equal(run(model, x), base)
        assert get_isr(model) == (2, 2, 2, 2)
    assert get_isr(model) == (2, 1, 1, 1)
    with pytest.raises(KeyError):
        with edaformer.isr(model, "1121"):
            raise KeyError("inside")
    assert get_isr(model) == (2, 1, 1, 1)
    assert torch.equal(run(model, x), reduced)


def test_deepcopy_carries_the_setting_independently():
    model = pvt()
    x = torch.randn(1, 3, 64, 64)
    base = run(model, x)
    set_isr(model, "2211")
    reduced = run(model, x)
    twin = copy.deepcopy(model)
    assert get_isr(twin) == (2, 2, 1, 1) and torch.equal(run(twin, x), reduced)
    set_isr(twin, "1111")
    assert torch.equal(run(twin, x), base) and hooks(twin) == 0 < hooks(model)
    assert torch.equal(run(model, x), reduced)


def test_timm_registry_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    base = run(model, x)
    with edaformer.isr(model, "2211"):
        reduced = run(model, x)
    assert reduced.shape == base.shape == (1, 3) and not torch.allclose(reduced, base)
    assert torch.equal(run(model, x), base)


@pytest.mark.parametrize("name", ["segformer-semantic-segmentation", "pvt_v2"])
def test_attention_flops_shrink_by_the_pooled_grid(name):
    model = BUILDERS[name]()
    size = (96, 96)  # stage grids 24, 12, 6, 3; reduced key/value grids 3x3 in every stage
    run(model, torch.randn(1, 3, 32, 32))
    own_hooks = hooks(model)
    base = count_flops_external(model, size)
    set_isr(model, "2211")
    isr_hooks = hooks(model)
    reduced = count_flops_external(model, size)
    assert next(model.parameters()).device.type == "cpu" and hooks(model) == isr_hooks > own_hooks  # on a copy
    assert reduced.isr == (2, 2, 1, 1) and base.isr == (1, 1, 1, 1)
    assert reduced.params == base.params == sum(p.numel() for p in model.parameters())

    # 2 * N_q * N_kv * C per call: stage 1 has 2 layers of 24x24 queries, 3x3 keys/values -> floor to 1x1
    assert [(call.stage, call.n_query, call.n_kv) for call in base.attention] == [
        (1, 576, 9), (1, 576, 9), (2, 144, 9), (3, 36, 9), (4, 9, 9)]
    assert [call.n_kv for call in reduced.attention] == [1, 1, 1, 9, 9]
    assert reduced.attention_by_stage() == {1: 2 * 2 * 576 * 1 * 8, 2: 2 * 144 * 1 * 16, 3: 2 * 36 * 9 * 24,
                                            4: 2 * 9 * 9 * 32}
    assert {s: base.attention_by_stage()[s] // v for s, v in reduced.attention_by_stage().items()} == {
        1: 9, 2: 9, 3: 1, 4: 1}

    # key/value projections see 8 fewer tokens in stages 1-2 (C -> 2C in total per layer); the pooling is counted
    saved = sum(layers * 8 * c * 2 * c for layers, c in ((2, 8), (1, 16)))
    assert base.by_type["Linear"] - reduced.by_type["Linear"] == saved
    assert reduced.by_type["ISR pooling"] == 2 * 9 * 8 + 9 * 16 and "ISR pooling" not in base.by_type
    assert {k: v for k, v in reduced.by_type.items() if k not in ("Linear", "ISR pooling")} == {
        k: v for k, v in base.by_type.items() if k != "Linear"}
    assert base.flops == base.module_flops + base.attention_flops and reduced.flops < base.flops


def test_conv_and_attention_flop_rules():
    report = count_flops_external(pvt(), (64, 64))  # stage grids 16, 8, 4, 2

    def conv(k, c_in, c_out, positions, groups=1):
        return (k * k * c_in // groups * c_out + c_out) * positions

    stem_and_downsampling = conv(7, 3, 8, 256) + conv(3, 8, 16, 64) + conv(3, 16, 24, 16) + conv(3, 24, 32, 4)
    reductions = 2 * conv(8, 8, 8, 4) + conv(4, 16, 16, 4) + conv(2, 24, 24, 4)  # every one ends at 2x2
    depthwise = sum(depth * conv(3, 2 * c, 2 * c, side * side, groups=2 * c)
                    for depth, c, side in zip(DEPTHS, DIMS, (16, 8, 4, 2)))
    assert report.by_type["Conv2d"] == stem_and_downsampling + reductions + depthwise
    assert [call.flops for call in report.attention] == [2 * 256 * 4 * 8] * 2 + [2 * 64 * 4 * 16, 2 * 16 * 4 * 24,
                                                                                 2 * 4 * 4 * 32]


def test_no_transformers_import_and_none_needed():
    code = "\n".join([
        "import sys, torch, edaformer, edaformer.isr_adapters",
        "print('imported:', 'transformers' in sys.modules)",
        "sys.modules['transformers'] = None  # importing it now fails",
        "from timm.models.pvt_v2 import PyramidVisionTransformerV2 as P",
        "m = P(depths=(1,1,1,1), embed_dims=(8,16,24,32), num_heads=(1,2,3,4), num_classes=2).eval()",
        "edaformer.set_isr(m, '2211')",
        "assert m(torch.randn(1, 3, 64, 64)).shape == (1, 2)",
        "try:",
        "    edaformer.set_isr(torch.nn.Linear(2, 2), '2211')",
        "except TypeError as e:",
        "    print('TypeError:', e)",
    ])
    env = {**os.environ, "PYTHONPATH": str(Path(edaformer.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported: False" in done.stdout
    assert "TypeError: Linear is not a supported model" in done.stdout


def test_flops_match_published_figures():
    """PVTv2-b0 (SegFormer-B0's 8.4 GFLOPs: tests/models/test_hf_segformer.py)."""
    import timm

    with torch.device("meta"):
        pvt_b0 = timm.create_model("pvt_v2_b0", pretrained=False)
    assert round(count_flops_external(pvt_b0, (224, 224)).gflops, 1) == 0.6  # PVTv2 paper, ImageNet


def test_pickled_and_feature_models_keep_the_setting(tmp_path):
    import timm

    model = timm.create_model("pvt_v2_b0", pretrained=False, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    base = [t.clone() for t in run(model, x)]
    set_isr(model, "2211")
    reduced = run(model, x)
    assert [t.shape for t in reduced] == [t.shape for t in base] and not torch.equal(reduced[0], base[0])
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert get_isr(loaded) == (2, 2, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(run(loaded, x), reduced))
    set_isr(loaded, "1111")
    assert all(torch.equal(a, b) for a, b in zip(run(loaded, x), base))
