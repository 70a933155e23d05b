"""Parameter / FLOP counts against the reference FLOP tool (../shared/fixtures/official/flops.json)."""
import json
from functools import lru_cache
from unittest import mock

import pytest
import torch

import edaformer
from edaformer import count_flops, create_model
from edaformer.isr import PAPER_ISR_SWEEP, isr as isr_context
from edaformer.models import efa
from tests.helpers.reference import FIXTURES, manifest, requires_fixtures

FLOPS_JSON = FIXTURES / "flops.json"
ROWS = json.loads(FLOPS_JSON.read_text())["rows"] if FLOPS_JSON.is_file() else []
DATASETS = {"ade": "ade20k", "coco": "cocostuff", "city": "cityscapes"}
GROUPS = {"encoder stage 1": "enc_stage1", "encoder stage 2": "enc_stage2", "encoder stage 3": "enc_stage3",
          "encoder stage 4": "enc_stage4", "decoder c2": "dec_attn2x1", "decoder c3": "dec_attn3x2",
          "decoder c4": "dec_attn4x3"}

# Published GFLOPs (paper, mmcv 1.3.0 rule): (size, dataset, input) -> values for PAPER_ISR_SWEEP.
PUBLISHED = {
    ("t", "ade20k", (512, 512)): (5.6, 5.3, 4.7, 4.1),
    ("b", "ade20k", (512, 512)): (32.0, 31.3, 29.4, 26.6),
    ("t", "cityscapes", (1024, 2048)): (151.7, 133.6, 94.9, 59.1),
    ("b", "cityscapes", (1024, 2048)): (605.9, 569.0, 452.9, 298.1),
}


@lru_cache(maxsize=None)
def meta_model(name: str, num_classes: int | None = None) -> edaformer.EDAFormer:
    """A model moved to ``meta`` (counted in place, the fast path of ``count_flops``).

    Counts depend on shapes only, so the slow truncated-normal init is skipped.
    """
    with mock.patch.object(efa, "trunc_normal_", lambda tensor, **kwargs: tensor):
        return create_model(name, num_classes=num_classes).to("meta").eval()


def _isr(row: dict) -> str:
    return "".join(map(str, row["encoder_reduction_ratios"])) + "-" + "".join(map(str, row["decoder_reduction_ratios"]))


def _row_id(row: dict) -> str:
    h, w = row["input_hw"]
    return f"{row['model'][-1]}-{row['dataset']}-{h}x{w}-{_isr(row)}"


def _model_for(row: dict) -> edaformer.EDAFormer:
    model = meta_model(f"edaformer-{row['model'][-1].lower()}-{DATASETS[row['dataset']]}", row["num_classes"])
    return model.set_isr(_isr(row))


@requires_fixtures
@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_matches_reference_flop_tool(row):
    report = count_flops(_model_for(row), row["input_hw"])
    totals = report.flops_by_convention
    # Exact integer totals under both rules (one pass measures both).
    assert report.flops == totals["mmcv130"] == row["mmcv130_variant_total_flops"]
    assert totals["mmcv127"] == row["total_flops"]
    assert report.gflops == pytest.approx(row["mmcv130_variant_gflops"], abs=0.01)
    assert totals["mmcv127"] / 1e9 == pytest.approx(row["gflops"], abs=0.01)
    # Parts: hook-counted modules (1.2.7 rule = without LayerNorm) and the attention terms.
    by_type = dict(report.by_type)
    assert by_type.pop("LayerNorm") == totals["mmcv130"] - totals["mmcv127"]
    assert by_type == row["module_flops_by_type"]
    assert report.module_flops - report.by_type["LayerNorm"] == row["module_flops"]
    assert report.attention_flops == row["attention_exact_macs_floored"] == row["attention_flops"]
    assert {GROUPS[g]: v for g, v in report.attention_by_group().items()} == row["attention_terms"]
    # Parameters and pooling.
    assert report.params == row["params"]
    assert report.params_excluding_conv_seg == row["params_excluding_conv_seg"]
    ratios = report.pool_ratios
    assert [ratios[f"encoder.stage{i}"] for i in range(1, 5)] == row["encoder_pool_kernels"]
    assert [ratios[f"decoder.c{i}"] for i in (2, 3, 4)] == row["decoder_pool_kernels_attn2_attn3_attn4"]


MMCV127_ROWS = [r for r in ROWS if _isr(r) in ("1111-111", "2211-222")]


@requires_fixtures
@pytest.mark.parametrize("row", MMCV127_ROWS, ids=[_row_id(r) for r in MMCV127_ROWS])
def test_mmcv127_convention(row):
    report = count_flops(_model_for(row), row["input_hw"], convention="mmcv127")
    assert report.flops == row["total_flops"]
    assert report.gflops == pytest.approx(row["gflops"], abs=0.01)
    assert report.by_type == row["module_flops_by_type"]
    assert report.module_flops == row["module_flops"]
    assert report.uncounted["LayerNorm"] == row["mmcv130_variant_total_flops"] - row["total_flops"]
    assert report.flops_by_convention["mmcv130"] == row["mmcv130_variant_total_flops"]


@pytest.mark.parametrize("key", list(PUBLISHED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_published_gflops(key):
    size, dataset, input_size = key
    model = meta_model(f"edaformer-{size}-{dataset}")
    for spec, published in zip(PAPER_ISR_SWEEP, PUBLISHED[key]):
        with isr_context(model, spec):
            assert round(count_flops(model, input_size).gflops, 1) == published, spec


def test_published_params():
    assert round(count_flops(meta_model("edaformer-t-ade20k")).params / 1e6, 2) == 4.95
    assert round(count_flops(meta_model("edaformer-b-ade20k")).params / 1e6, 2) == 29.46


@requires_fixtures
@pytest.mark.parametrize("setting", ["e1111_d111", "e2211_d222", "e2221_d222"])
def test_pooled_grids_match_reference_geometry(setting):
    """Non-square input whose sides are not multiples of 32: the floored key/value grids."""
    expected = manifest("t")["settings"][setting]["per_input"]["x200x328"]["avgpool_geometry"]
    with isr_context(meta_model("edaformer-t-ade20k"), setting.replace("e", "").replace("_d", "-")) as model:
        terms = count_flops(model, (200, 328)).attention
    got = sorted((t.pool_ratio, t.query_hw, t.kv_hw) for t in terms)
    assert got == sorted((g["kernel"], tuple(g["in_hw"]), tuple(g["out_hw"])) for g in expected)
    assert all(t.flops_exact == 2 * t.query_hw[0] * t.query_hw[1] * t.kv_hw[0] * t.kv_hw[1] * t.channels for t in terms)


def test_real_model_left_untouched():
    model = create_model("edaformer-t-ade20k", isr="2211-222").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = count_flops(model, (512, 512))
    assert round(report.gflops, 2) == 4.71
    assert model.training and all(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_hooks_with_kwargs for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.params_excluding_conv_seg == sum(p.numel() for p in model.parameters())
    assert report.isr == "2211-222"


def test_meta_model_flags_restored():
    model = meta_model("edaformer-t-ade20k").train()
    count_flops(model, (256, 256))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_hooks_with_kwargs for m in model.modules())
    model.eval()


def test_report_dict_is_json():
    report = count_flops(meta_model("edaformer-t-ade20k"), (512, 512))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["params"] == report.params and d["gflops"] == report.gflops
    assert d["uncounted"] == {"BatchNorm2d": 2 * 128 * 64 * 64}
    assert len(d["attention"]) == 2 + 2 + 10 + 2 + 1 + 2 + 3
    assert "GFLOPs" in report.format_table()


@pytest.mark.parametrize("kwargs, match", [
    (dict(convention="mmcv999"), "unknown FLOP convention"),
    (dict(input_size=(0, 512)), "must be positive"),
    (dict(input_size=(512,)), r"\(height, width\)"),
    (dict(input_size=(64, 64)), "does not fit"),
])
def test_errors(kwargs, match):
    with isr_context(meta_model("edaformer-t-ade20k"), "4411-111") as model, pytest.raises(ValueError, match=match):
        count_flops(model, **{"input_size": (512, 512), **kwargs})


def test_wrapped_model_is_unwrapped():
    model = meta_model("edaformer-t-ade20k")
    report = count_flops(torch.nn.DataParallel(model), (512, 512))
    assert report.flops == count_flops(model, (512, 512)).flops and report.isr == "1111-111"


def test_reference_rule_at_sizes_windows_do_not_divide():
    """375x500, ISR 2211-222: the attention follows the reference tool's true-division term."""
    model = meta_model("edaformer-t-ade20k")
    with isr_context(model, "2211-222"):
        report = count_flops(model, (375, 500))
    # (stride, pool ratio, channels, layers): encoder stages 1-4, then decoder c2, c3, c4
    layers = [(4, 16, 32, 2), (8, 8, 64, 2), (16, 2, 128, 10), (32, 1, 256, 2),
              (8, 8, 64, 1), (16, 4, 128, 2), (32, 2, 256, 3)]
    expected = 0.0
    for stride, r, c, depth in layers:
        h, w = 375 // stride, 500 // stride
        expected += depth * 2 * (h * w) * (h / r * w / r) * c
    assert report.attention_flops == pytest.approx(expected, rel=1e-12)
    assert report.flops == pytest.approx(report.module_flops + expected, rel=1e-12)
    assert report.flops_by_convention["mmcv130"] == pytest.approx(report.flops, rel=1e-12)
    exact = sum(2 * t.query_hw[0] * t.query_hw[1] * t.kv_hw[0] * t.kv_hw[1] * t.channels for t in report.attention)
    assert report.attention_flops_exact == exact
    assert report.flops_exact == report.module_flops + exact
    assert abs(report.flops_exact - report.flops) > 1e6  # the floored grids give another count here
    d = report.to_dict()
    assert d["gflops"] == report.gflops and d["gflops_exact"] == report.gflops_exact != d["gflops"]
    assert "GFLOPs (exact grids)" in report.format_table()


@lru_cache(maxsize=None)
def variant_flops(size: tuple[int, int] = (512, 512), spec: str = "1111-111", pool: str = "avg", **options):
    with mock.patch.object(efa, "trunc_normal_", lambda tensor, **kwargs: tensor), torch.device("meta"):
        model = create_model("edaformer-t-ade20k", **{k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in options.items()}).eval()
    model.set_isr(spec, pool=pool)
    return count_flops(model, size)


def test_decoder_depth_flops_are_affine_in_the_block_counts():
    base = variant_flops().flops
    delta = {d: variant_flops(decoder_depths=d).flops - base for d in [(2, 2, 2), (1, 2, 3), (1, 4, 1), (0, 2, 1),
                                                                         (3, 3, 1)]}
    per_block_c4, per_block_c3 = -delta[(0, 2, 1)] / 3, delta[(3, 3, 1)]
    per_block_c2 = delta[(2, 2, 2)] + per_block_c4
    assert 0 < per_block_c4 < per_block_c3 < per_block_c2  # a block costs more on a finer level
    assert delta[(1, 2, 3)] == pytest.approx(-2 * per_block_c4 + 2 * per_block_c2, rel=1e-12)
    assert delta[(1, 4, 1)] == pytest.approx(-2 * per_block_c4 + 2 * per_block_c3, rel=1e-12)
    assert base < variant_flops(decoder_depths=(1, 4, 1)).flops < variant_flops(decoder_depths=(2, 2, 2)).flops \
        < variant_flops(decoder_depths=(1, 2, 3)).flops
    assert variant_flops(decoder_depths=(2, 2, 2)).params_excluding_conv_seg > 0


def test_decoder_op_flops():
    ref, attn = variant_flops(), variant_flops(decoder_op="attention")
    dw, conv = variant_flops(decoder_op="dwconv"), variant_flops(decoder_op="conv")
    # attention = EFA + the q/k/v projections (Linear rule), the attention term as for EFA
    levels = [(64 * 64, 16 * 16, 64, 1), (32 * 32, 16 * 16, 128, 2), (16 * 16, 16 * 16, 256, 3)]  # (Nq, Nkv, C, blocks)
    qkv = sum(d * (nq * c * c + 2 * nkv * c * c) for nq, nkv, c, d in levels)
    assert attn.by_type["Linear"] - ref.by_type["Linear"] == qkv
    assert attn.attention_flops == ref.attention_flops and attn.flops == ref.flops + qkv
    # the conv mixers: no decoder attention terms and no decoder pooling
    for report in (dw, conv):
        assert report.flops > 0 and not any(t.group.startswith("decoder") for t in report.attention)
        assert set(report.pool_ratios) == {f"encoder.stage{i}" for i in range(1, 5)}
    no_decoder_attention = ref.attention_flops - sum(v for g, v in ref.attention_by_group().items() if "decoder" in g)
    assert dw.attention_flops == conv.attention_flops == pytest.approx(no_decoder_attention, rel=1e-12)
    # dense 3x3 conv on every decoder token: 9 C^2 multiply-adds + C bias per token
    dense = sum(d * nq * (9 * c * c + c) for nq, _, c, d in levels)
    depthwise = sum(d * nq * (9 * c + c + c * c + c) for nq, _, c, d in levels)
    assert conv.by_type["Conv2d"] - dw.by_type["Conv2d"] == dense - depthwise
    assert dw.flops < ref.flops < attn.flops and conv.flops > ref.flops
    # a decoder ISR factor does nothing where there is no pooling
    assert variant_flops(spec="1111-444", decoder_op="dwconv").flops == dw.flops
    assert variant_flops(spec="1111-222", decoder_op="attention").flops < attn.flops


def test_pool_variant_flops():
    avg = variant_flops(spec="2211-222")
    mx, overlap, merge = (variant_flops(spec="2211-222", pool=p) for p in ("max", "overlap", "merge"))
    assert mx.flops == avg.flops and mx.attention_flops == avg.attention_flops
    assert mx.by_type["MaxPool2d"] + mx.by_type["AvgPool2d"] == avg.by_type["AvgPool2d"]
    # overlap: the same grids (same attention), the 2r x 2r windows read ~4x the inputs
    assert overlap.attention_flops == avg.attention_flops and overlap.attention_flops_exact == avg.attention_flops_exact
    assert overlap.flops > avg.flops
    assert overlap.flops - avg.flops == overlap.by_type["AvgPool2d (overlapping)"] + overlap.by_type["AvgPool2d"] \
        - avg.by_type["AvgPool2d"]
    assert avg.merge_flops == mx.merge_flops == overlap.merge_flops == 0
    # merge: pools at the training ratio, then halves the tokens; the matching is counted on its own
    assert merge.merge_flops > 0 and merge.flops == merge.module_flops + merge.attention_flops + merge.merge_flops
    train = variant_flops()
    merged = [t for t in merge.attention if t.pool == "merge" and t.layer.startswith(("encoder.stages.0",
                                                                                       "decoder.c"))]
    assert merged and all(t.kv_tokens == t.kv_hw[0] * t.kv_hw[1] - t.kv_hw[0] * t.kv_hw[1] // 2 for t in merged)
    assert sum(t.merge_flops for t in merge.attention) == merge.merge_flops
    assert avg.flops < merge.flops and merge.attention_flops < train.attention_flops
    # factor 1 everywhere: every pool is the training computation
    for pool in ("max", "overlap", "merge"):
        assert variant_flops(pool=pool).flops == train.flops
    d = json.loads(json.dumps(merge.to_dict()))
    assert d["merge_flops"] == merge.merge_flops and d["isr_pool"] == "merge"
    assert "token merging" in merge.format_table() and "(merge)" in merge.format_table()


def test_train_isr_flops_equal_isr_at_inference():
    assert variant_flops(train_isr="2211-222").flops == variant_flops(spec="2211-222").flops
    assert round(variant_flops(train_isr="2211-222").gflops, 2) == 4.71
