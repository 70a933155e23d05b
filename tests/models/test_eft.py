"""EFT encoder: timm registration, stage geometry, ISR factors and the closed-form minimum input."""
import pytest
import timm
import torch

from edaformer.models.eft import EFT, OverlapPatchEmbed


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return EFT(num_classes=0).eval()


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


@pytest.mark.parametrize("hw", [(200, 328), (97, 131), (64, 64)])
def test_stage_sizes_match_the_forward(encoder, hw):
    with torch.no_grad():
        outs = encoder.forward_stages(torch.randn(1, 3, *hw))
    assert encoder.stage_sizes(*hw) == [tuple(o.shape[-2:]) for o in outs]
    assert encoder.check_input_size(*hw) == encoder.stage_sizes(*hw)


@pytest.mark.parametrize("kernel, stride", [(7, 4), (3, 2)])
def test_patch_embed_min_input_inverts_its_output_size(kernel, stride):
    embed = OverlapPatchEmbed(3, 8, kernel, stride)
    for out in range(1, 40):
        side = embed.min_input_size(out, out)[0]
        assert embed.output_size(side, side)[0] >= out
        assert side == 1 or embed.output_size(side - 1, side - 1)[0] < out


def test_set_isr_sets_every_block_of_each_stage(encoder):
    try:
        encoder.set_isr((2, 2, 1, 3))
        assert encoder.pool_ratios() == (16, 8, 2, 3)
        assert all(blk.attn.isr_factor == f for stage, f in zip(encoder.stages, (2, 2, 1, 3))
                   for blk in stage.blocks)
        assert [stage.pool_ratio for stage in encoder.stages] == [16, 8, 2, 3]
    finally:
        encoder.set_isr((1, 1, 1, 1))
    assert encoder.pool_ratios() == (8, 4, 2, 1)


def test_set_isr_needs_four_factors(encoder):
    with pytest.raises(ValueError, match="the encoder needs 4 ISR factors, got 3"):
        encoder.set_isr((1, 1, 1))


def test_min_input_size_defaults_to_own_pool_ratios(encoder):
    # stage 1 (stride 4, k7 p3) must hold an 8x8 window: 4 * (8 - 1) + 7 - 6 = 29
    assert encoder.min_input_size() == (29, 29)
    assert encoder.min_input_size((1, 1, 1, 2)) == (33, 33)  # stage 4 grid >= 2 needs 33
    with pytest.raises(ValueError, match="stage_minima needs 4 values"):
        encoder.min_input_size((1, 2))


def test_too_small_input_names_the_stage(encoder):
    with pytest.raises(ValueError, match="encoder stage 1: pooling ratio 8"):
        encoder.check_input_size(28, 64)
