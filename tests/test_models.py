"""Model construction, forward contract, ISR switching, timm registration."""
import pytest
import timm
import torch

import edaformer
from edaformer.models import MODEL_SPECS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k", num_classes=5).eval()


def test_list_models():
    names = edaformer.list_models()
    assert names == sorted(f"edaformer-{s}-{d}" for s in "tb" for d in ("ade20k", "cityscapes", "cocostuff"))
    assert {n: MODEL_SPECS[n].num_classes for n in names if "-t-" in n} == {
        "edaformer-t-ade20k": 150, "edaformer-t-cityscapes": 19, "edaformer-t-cocostuff": 171}


@pytest.mark.parametrize("name,params", [("edaformer-t-ade20k", 4_929_914), ("edaformer-b-ade20k", 29_438_166)])
def test_param_counts_match_reference(name, params):
    model = edaformer.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params  # reference total minus the unused conv_seg


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'edaformer-x'"):
        edaformer.create_model("edaformer-x")


@pytest.mark.parametrize("hw", [(64, 64), (200, 328), (97, 131)])
def test_forward_returns_input_size(tiny, hw):
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, *hw))
    assert out.shape == (1, 5, *hw)


def test_forward_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\)"):
        tiny(torch.randn(3, 64, 64))


def test_set_isr_changes_ratios_without_touching_weights(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        base = tiny(x)
        tiny.set_isr("2211-222")
        assert str(tiny.isr) == "2211-222"
        assert tiny.pool_ratios() == {"encoder.stage1": 16, "encoder.stage2": 8, "encoder.stage3": 2,
                                      "encoder.stage4": 1, "decoder.c2": 8, "decoder.c3": 4, "decoder.c4": 2}
        reduced = tiny(x)
        tiny.set_isr("1111-111")
        again = tiny(x)
    assert not torch.allclose(base, reduced)
    assert torch.equal(base, again)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_isr_context_manager_restores(tiny):
    tiny.set_isr("2211-222")
    with edaformer.isr(tiny, "2222-222") as m:
        assert m is tiny and str(tiny.isr) == "2222-222"
        assert tiny.pool_ratios()["encoder.stage4"] == 2
    assert str(tiny.isr) == "2211-222"
    tiny.set_isr((1, 1, 1, 1, 1, 1, 1))
    assert tiny.isr == edaformer.ISRSetting((1, 1, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("spec,match", [
    ("221-222", "encoder needs 4 factors"),
    ("2211-22", "decoder needs 3 factors"),
    ("2201-222", "encoder factor 0 must be >= 1"),
    ("22a1-222", "expected 4 encoder digits"),
    ("2211222", "expected 4 encoder digits"),
    ((2, 2, 1), "give \\(encoder 4-tuple, decoder 3-tuple\\)"),
    (((2, 2, 1, 1), (2, 2, 0)), "decoder factor 0"),
    (((2, 2, 1, 1.5), (2, 2, 2)), "not a positive integer"),
])
def test_bad_isr_specs(tiny, spec, match):
    with pytest.raises(ValueError, match=match):
        tiny.set_isr(spec)
    assert str(tiny.isr) == "1111-111"


def test_parse_isr_forms():
    assert edaformer.parse_isr("2211-222") == edaformer.parse_isr(((2, 2, 1, 1), (2, 2, 2)))
    assert edaformer.parse_isr(" 4,2,2,1 - 2,2,2 ").encoder == (4, 2, 2, 1)
    assert str(edaformer.parse_isr(((16, 2, 1, 1), (2, 2, 2)))) == "16,2,1,1-2,2,2"


def test_ratio_too_large_for_map_names_stage_size_and_ratio(tiny):
    x = torch.randn(1, 3, 64, 64)  # stage 1 is 16x16; 8 x 4 = 32 does not fit
    with edaformer.isr(tiny, "4111-111"):
        with pytest.raises(ValueError, match=r"encoder stage 1: pooling ratio 32 .* 16x16 feature map"):
            tiny(x)
        with pytest.raises(ValueError, match="encoder stage 1"):
            tiny.check_input_size(64, 64)
    with edaformer.isr(tiny, "1111-181"):  # c3 is 4x4 at 64x64 input: 2 x 8 = 16
        with pytest.raises(ValueError, match=r"decoder c3: pooling ratio 16 .* 4x4"):
            tiny(x)
    tiny.check_input_size(64, 64)


def test_no_weight_decay_lists_norm_params(tiny):
    names = tiny.no_weight_decay()
    assert "decoder.fuse.bn.weight" in names and "encoder.stages.0.norm.bias" in names
    assert "encoder.stages.0.blocks.0.attn.sr.weight" not in names
    assert all(n in dict(tiny.named_parameters()) for n in names)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3, drop_path_rate=0.0, dropout=0.0,
                                   decoder_drop_path=0.0)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.encoder.stages[0].downsample.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_timm_registration_and_features():
    assert {"eft_t", "eft_b"} <= set(timm.list_models("eft_*"))
    clf = timm.create_model("eft_t")
    assert clf(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    feats = timm.create_model("eft_t", features_only=True)
    outs = feats(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    assert feats.feature_info.channels() == [32, 64, 128, 256]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    b = timm.create_model("eft_b", num_classes=10)
    assert b(torch.randn(1, 3, 64, 64)).shape == (1, 10)
