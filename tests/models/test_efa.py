"""EFA, ConvFFN and EFABlock: pooled key/value grids, explicit-attention equivalence, copy-free layouts."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import edaformer
from edaformer.models import efa


@pytest.fixture(scope="module")
def model_t():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k").eval()


def test_pooled_grid_floors_and_names_the_layer():
    attn = efa.EFA(8, 2, train_ratio=4, name="encoder stage 2")
    attn.isr_factor = 2
    assert attn.pool_ratio == 8 and attn.pooled_hw(25, 41) == (3, 5)
    with pytest.raises(ValueError, match=r"encoder stage 2: pooling ratio 8 \(train 4 x ISR 2\) .* 7x41"):
        attn.pooled_hw(7, 41)


def test_dim_must_split_into_heads():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 4"):
        efa.EFA(10, 4, train_ratio=1)


@pytest.mark.parametrize("kv_norm", [False, True])
def test_efa_equals_explicit_softmax_attention(kv_norm):
    torch.manual_seed(0)
    attn = efa.EFA(8, 2, train_ratio=2, kv_norm=kv_norm).eval()
    h, w = 6, 10
    x = torch.randn(2, h * w, 8)
    with torch.no_grad():
        kv = F.avg_pool2d(x.transpose(1, 2).reshape(2, 8, h, w), 2, 2)
        kv = attn.sr(kv).flatten(2).transpose(1, 2)
        if kv_norm:
            kv = attn.act(attn.norm(kv))
        q = x.reshape(2, h * w, 2, 4).transpose(1, 2)
        k = kv.reshape(2, -1, 2, 4).transpose(1, 2)
        weights = (q @ k.transpose(-2, -1) * 4 ** -0.5).softmax(-1)
        expected = attn.proj((weights @ k).transpose(1, 2).reshape(2, h * w, 8))
        torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-6)


def test_token_map_views_share_memory():
    x = torch.randn(2, 12, 5)
    m = efa.to_map(x, 3, 4)
    assert m.shape == (2, 5, 3, 4) and m.data_ptr() == x.data_ptr()
    assert m.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(efa.to_tokens(m), x)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func.overloadpacket), args))
        return out


def test_forward_has_no_layout_copies_and_uses_fused_attention(model_t):
    rec = _OpRecorder()
    with torch.inference_mode(), rec:
        model_t(torch.randn(1, 3, 96, 160))
    names = [name for name, _ in rec.calls]
    # token <-> map conversions, head split/merge and stage outputs are all views
    for op in ("aten.clone", "aten.copy_", "aten.contiguous", "aten._unsafe_view", "aten.bmm", "aten._softmax"):
        assert op not in names, op
    sdpa = [args for name, args in rec.calls if name == "aten.scaled_dot_product_attention"]
    assert len(sdpa) == len(model_t.attention_layers())
    for q, k, v in (a[:3] for a in sdpa):
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


def test_cpu_sdpa_backend_is_flash(model_t):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model_t(torch.randn(1, 3, 64, 64))
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    blk = efa.EFABlock(8, 2, 2.0, 1, norm_eps=1e-6).eval()
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        y = x + blk.attn(blk.norm1(x), 4, 4)
        expected = y + blk.mlp(blk.norm2(y), 4, 4)
        torch.testing.assert_close(blk(x, 4, 4), expected)
