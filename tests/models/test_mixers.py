"""Decoder operations at the EFA position (efa, attention, dwconv, conv): explicit computations,
parameter differences, ISR on levels without pooling, minimum input size."""
import pytest
import torch
import torch.nn.functional as F

import edaformer
from edaformer.models import efa, mixers
from edaformer.models.decoder import AllAttentionDecoder

OPS = mixers.DECODER_OPS


def _tokens(b, h, w, c, seed=0):
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


def _map(x, h, w):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def test_attention_equals_explicit_qkv_attention():
    torch.manual_seed(0)
    attn = mixers.Attention(8, 2, train_ratio=2, kv_norm=True).eval()
    h, w = 6, 10
    x = _tokens(2, h, w, 8)
    with torch.no_grad():
        kv = attn.sr(F.avg_pool2d(_map(x, h, w), 2, 2)).flatten(2).transpose(1, 2)
        kv = attn.act(attn.norm(kv))
        q = attn.q(x).reshape(2, h * w, 2, 4).transpose(1, 2)
        k = attn.k(kv).reshape(2, -1, 2, 4).transpose(1, 2)
        v = attn.v(kv).reshape(2, -1, 2, 4).transpose(1, 2)
        weights = (q @ k.transpose(-2, -1) * 4 ** -0.5).softmax(-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, h * w, 8))
        torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-6)


def test_attention_takes_isr_like_efa():
    attn = mixers.Attention(8, 2, train_ratio=2)
    attn.set_isr(2, "max")
    assert attn.pool_ratio == 4 and attn.pooled_hw(9, 13) == (2, 3)
    with torch.no_grad():
        assert attn(_tokens(1, 9, 13, 8), 9, 13).shape == (1, 9 * 13, 8)


def test_conv_mixers_equal_explicit_convolutions():
    torch.manual_seed(0)
    h, w = 5, 7
    x = _tokens(2, h, w, 6)
    dw = mixers.DWConvMixer(6).eval()
    conv = mixers.ConvMixer(6).eval()
    with torch.no_grad():
        m = _map(x, h, w)
        y = F.conv2d(F.conv2d(m, dw.dwconv.weight, dw.dwconv.bias, padding=1, groups=6), dw.pwconv.weight,
                     dw.pwconv.bias)
        torch.testing.assert_close(dw(x, h, w), y.flatten(2).transpose(1, 2))
        y = F.conv2d(m, conv.conv.weight, conv.conv.bias, padding=1)
        torch.testing.assert_close(conv(x, h, w), y.flatten(2).transpose(1, 2))
    assert dw.dwconv.kernel_size == (3, 3) and dw.dwconv.groups == 6 and dw.pwconv.kernel_size == (1, 1)
    assert conv.conv.kernel_size == (3, 3) and conv.conv.groups == 1


@pytest.mark.parametrize("op", ["dwconv", "conv", "attention"])
def test_block_keeps_pre_norm_residual_and_ffn(op):
    torch.manual_seed(0)
    mixer = mixers.build_mixer(op, 8, 2, 1, kv_norm=True, name="x")
    blk = efa.EFABlock(8, 2, 2.0, 1, norm_eps=1e-5, ffn_relu=False, mixer=mixer).eval()
    assert blk.attn is mixer
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        y = x + mixer(blk.norm1(x), 4, 4)
        torch.testing.assert_close(blk(x, 4, 4), y + blk.mlp(blk.norm2(y), 4, 4))


def _decoder(op, **kwargs):
    torch.manual_seed(0)
    return AllAttentionDecoder((16, 32, 64), num_classes=3, embed_dim=8, mlp_ratio=2.0, op=op, **kwargs).eval()


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_decoder_op_parameter_differences():
    dims, depths = (16, 32, 64), (1, 2, 3)  # (c2, c3, c4)
    base = _params(_decoder("efa"))
    blocks = [c for c, d in zip(dims, depths) for _ in range(d)]
    qkv = sum(3 * (c * c + c) for c in blocks)
    efa_mixer = sum(c * c + c + 2 * c + c * c + c for c in blocks)  # sr, LayerNorm, proj
    assert _params(_decoder("attention")) == base + qkv
    assert _params(_decoder("dwconv")) == base - efa_mixer + sum(9 * c + c + c * c + c for c in blocks)
    assert _params(_decoder("conv")) == base - efa_mixer + sum(9 * c * c + c for c in blocks)


@pytest.mark.parametrize("op", OPS)
def test_decoder_ops_shapes(op):
    decoder = _decoder(op)
    feats = [torch.randn(1, 16, 8, 12), torch.randn(1, 32, 4, 6), torch.randn(1, 64, 2, 3)]
    with torch.no_grad():
        assert decoder(feats).shape == (1, 3, 8, 12)
    assert decoder.op == op


@pytest.mark.parametrize("op", ["dwconv", "conv"])
def test_isr_is_a_no_op_without_pooling(op):
    decoder = _decoder(op)
    feats = [torch.randn(1, 16, 8, 12), torch.randn(1, 32, 4, 6), torch.randn(1, 64, 2, 3)]
    with torch.no_grad():
        base = decoder(feats)
        decoder.set_isr((8, 8, 8), pool="max")
        assert torch.equal(decoder(feats), base)
    assert decoder.pool_ratios() == (None, None, None)
    decoder.check_input_size([(1, 1), (1, 1), (1, 1)])
    with torch.no_grad():
        small = [torch.randn(1, 16, 1, 1), torch.randn(1, 32, 1, 1), torch.randn(1, 64, 1, 1)]
        assert decoder(small).shape == (1, 3, 1, 1)


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown decoder_op 'mlp'; choose one of efa, attention, dwconv, conv"):
        edaformer.create_model("edaformer-t-ade20k", decoder_op="mlp")


def _fits(model, h, w):
    try:
        model.check_input_size(h, w)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("op", OPS)
def test_model_ops_run_and_min_input_size(op):
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4, decoder_op=op).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)
    with edaformer.isr(model, "1111-118"):  # c4 needs an 8x8 window only where it pools
        h, w = model.min_input_size()
        assert (h, w) == ((225, 225) if op in ("efa", "attention") else (29, 29))
        assert _fits(model, h, w) and not _fits(model, h - 1, w) and not _fits(model, h, w - 1)
        decoder_keys = {k for k in model.pool_ratios() if k.startswith("decoder")}
        assert decoder_keys == ({"decoder.c2", "decoder.c3", "decoder.c4"} if op in ("efa", "attention") else set())
        with torch.no_grad():
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
