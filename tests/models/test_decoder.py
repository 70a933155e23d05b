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
