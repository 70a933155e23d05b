"""All-attention decoder: ISR factors per level, pool ratios, grid checks, output stride."""
import pytest
import torch

from edaformer.models.decoder import AllAttentionDecoder


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return AllAttentionDecoder((64, 128, 256), num_classes=5, embed_dim=32, mlp_ratio=2.0).eval()


def test_set_isr_sets_every_block_of_each_level(decoder):
    try:
        decoder.set_isr((2, 3, 4))
        assert decoder.pool_ratios() == (8, 6, 4)
        assert all(blk.attn.isr_factor == f for blocks, f in zip(decoder.levels(), (2, 3, 4)) for blk in blocks)
    finally:
        decoder.set_isr((1, 1, 1))
    assert decoder.pool_ratios() == (4, 2, 1)


def test_set_isr_needs_three_factors(decoder):
    with pytest.raises(ValueError, match="the decoder needs 3 ISR factors, got 4"):
        decoder.set_isr((1, 1, 1, 1))


def test_check_input_size_names_the_level(decoder):
    decoder.check_input_size([(4, 4), (2, 2), (1, 1)])
    with pytest.raises(ValueError, match=r"decoder c3: pooling ratio 2 .* 1x2"):
        decoder.check_input_size([(4, 4), (1, 2), (1, 1)])


def test_logits_at_stride_8(decoder):
    feats = [torch.randn(1, 64, 8, 12), torch.randn(1, 128, 4, 6), torch.randn(1, 256, 2, 3)]
    with torch.no_grad():
        assert decoder(feats).shape == (1, 5, 8, 12)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _block_params(decoder, level):
    return _params(getattr(decoder, f"c{level}")[0])


@pytest.mark.parametrize("depths", [(2, 2, 2), (1, 2, 3), (1, 4, 1), (3, 2, 1)])
def test_depth_variants_add_or_remove_whole_reference_blocks(decoder, depths):
    torch.manual_seed(0)
    variant = AllAttentionDecoder((64, 128, 256), num_classes=5, embed_dim=32, mlp_ratio=2.0, depths=depths)
    a, b, c = depths
    assert variant.depths == depths and [len(blocks) for blocks in variant.levels()] == [c, b, a]
    expected = _params(decoder) + sum((new - old) * _block_params(decoder, level)
                                      for new, old, level in zip(depths, (3, 2, 1), (4, 3, 2)))
    assert _params(variant) == expected
    # every block keeps the reference width and heads of its level
    for blocks, (dim, heads) in zip(variant.levels(), ((64, 2), (128, 4), (256, 8))):
        assert all(blk.attn.num_heads == heads and blk.norm1.normalized_shape == (dim,) for blk in blocks)
        assert all(blk.mlp.fc1.out_features == 2 * dim for blk in blocks)
    feats = [torch.randn(1, 64, 8, 12), torch.randn(1, 128, 4, 6), torch.randn(1, 256, 2, 3)]
    with torch.no_grad():
        assert variant.eval()(feats).shape == (1, 5, 8, 12)


def test_depth_zero_passes_the_encoder_map_to_the_fuse():
    torch.manual_seed(0)
    dec = AllAttentionDecoder((8, 16, 32), num_classes=3, embed_dim=8, mlp_ratio=2.0, depths=(0, 0, 0)).eval()
    assert dec.pool_ratios() == (None, None, None) and not list(dec.c2) and not dec.attention(0)
    dec.set_isr((4, 4, 4))
    dec.check_input_size([(1, 1), (1, 1), (1, 1)])
    feats = [torch.randn(1, 8, 8, 12), torch.randn(1, 16, 4, 6), torch.randn(1, 32, 2, 3)]
    with torch.no_grad():
        up = [torch.nn.functional.interpolate(f, size=(8, 12), mode="bilinear", align_corners=False)
              for f in feats[1:]]
        expected = dec.classifier(dec.fuse(torch.cat([up[1], up[0], feats[0]], dim=1)))
        torch.testing.assert_close(dec(feats), expected)


def test_depth_zero_at_one_level_keeps_the_others():
    dec = AllAttentionDecoder((8, 16, 32), num_classes=3, embed_dim=8, mlp_ratio=2.0, depths=(0, 2, 1))
    dec.set_isr((2, 3, 4))
    assert dec.pool_ratios() == (8, 6, None)


@pytest.mark.parametrize("depths", [(3, 2), (3, 2, -1), (3, 2, 1.0), "321", None, (True, 2, 1)])
def test_bad_depths(depths):
    with pytest.raises(ValueError, match=r"decoder_depths must be 3 integers >= 0 \(blocks at c4, c3, c2\)"):
        AllAttentionDecoder((8, 16, 32), num_classes=3, embed_dim=8, mlp_ratio=2.0, depths=depths)
