"""EDAFormer: forward contract, ISR switching through encoder and decoder, input-size limits,
training helpers, autocast and torch.compile."""
import pytest
import torch

import edaformer
from tests.helpers.reference import manifest, requires_fixtures

MIN_SIZE_SETTINGS = ["1111-111", "1111-222", "2211-222", "2222-222", "4444-444", "8111-111", "1118-118"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k", num_classes=5).eval()


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


def test_set_isr_hands_the_factors_to_encoder_and_decoder(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny.encoder, "set_isr", lambda f, pool: calls.append(("encoder", f, pool)))
    monkeypatch.setattr(tiny.decoder, "set_isr", lambda f, pool: calls.append(("decoder", f, pool)))
    tiny.set_isr("2,2,1,1-2,2,3")
    tiny.set_isr("2,2,1,1-2,2,2", pool="max")
    assert calls == [("encoder", (2, 2, 1, 1), "avg"), ("decoder", (2, 2, 3), "avg"),
                     ("encoder", (2, 2, 1, 1), "max"), ("decoder", (2, 2, 2), "max")]
    monkeypatch.undo()
    tiny.set_isr("1111-111")


def test_isr_context_manager_restores(tiny):
    tiny.set_isr("2211-222")
    with edaformer.isr(tiny, "2222-222") as m:
        assert m is tiny and str(tiny.isr) == "2222-222"
        assert tiny.pool_ratios()["encoder.stage4"] == 2
    assert str(tiny.isr) == "2211-222"
    tiny.set_isr((1, 1, 1, 1, 1, 1, 1))
    assert tiny.isr == edaformer.ISRSetting((1, 1, 1, 1), (1, 1, 1))


def test_bad_isr_spec_leaves_the_setting(tiny):
    with pytest.raises(ValueError, match="decoder needs 3 factors"):
        tiny.set_isr("2211-22")
    assert str(tiny.isr) == "1111-111" and tiny.pool_ratios()["encoder.stage1"] == 8


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
        with pytest.raises(ValueError, match="decoder c3"):
            tiny.check_input_size(64, 64)
    tiny.check_input_size(64, 64)
    with edaformer.isr(tiny, "2222-222"), pytest.raises(ValueError, match=r"encoder stage \d.*pooling ratio"):
        with torch.inference_mode():
            tiny(torch.randn(1, 3, 32, 32))


def _fits(model, h, w) -> bool:
    try:
        model.check_input_size(h, w)
    except ValueError:
        return False
    return True


def _brute_force_min_side(model, axis: int, other: int = 4096) -> int:
    return next(s for s in range(1, other) if _fits(model, *((s, other) if axis == 0 else (other, s))))


@pytest.mark.parametrize("spec", MIN_SIZE_SETTINGS)
def test_min_input_size_closed_form_equals_search(tiny, spec):
    with edaformer.isr(tiny, spec):
        min_h, min_w = tiny.min_input_size()
        assert (min_h, min_w) == (_brute_force_min_side(tiny, 0), _brute_force_min_side(tiny, 1))
        assert _fits(tiny, min_h, min_w)
        assert not _fits(tiny, min_h - 1, min_w) and not _fits(tiny, min_h, min_w - 1)


def test_min_input_size_runs(tiny):
    with edaformer.isr(tiny, "2211-222"), torch.no_grad():
        h, w = tiny.min_input_size()
        assert (h, w) == (61, 61)
        assert tiny(torch.randn(1, 3, h, w)).shape == (1, 5, h, w)


def test_min_input_size_takes_the_decoder_into_account(tiny):
    # c4 (stage 4, stride 32) must hold an 8x8 window: more than stage 1's 8x8 window asks
    with edaformer.isr(tiny, "1111-118"):
        assert tiny.min_input_size() == (225, 225)


def test_no_weight_decay_lists_norm_params(tiny):
    names = tiny.no_weight_decay()
    assert "decoder.fuse.bn.weight" in names and "encoder.stages.0.norm.bias" in names
    assert "encoder.stages.0.blocks.0.attn.sr.weight" not in names
    assert all(n in dict(tiny.named_parameters()) for n in names)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3, drop_path_rate=0.0, dropout=0.0,
                                   decoder_drop_path=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if n in g0:
            torch.testing.assert_close(p.grad, g0[n], rtol=1e-4, atol=1e-6)


def test_inference_mode_matches_no_grad(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a = tiny(x)
    with torch.no_grad():
        b = tiny(x)
    assert torch.equal(a, b)


def test_cpu_bf16_autocast_runs_close_to_fp32(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # bf16 keeps 8 bits of mantissa: stated tolerance 5% of the logits' range
    assert (low.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.slow
def test_torch_compile_has_no_graph_breaks(tiny):
    dynamo = pytest.importorskip("torch._dynamo")
    try:
        explanation = dynamo.explain(tiny)(torch.randn(1, 3, 64, 64))
    except Exception as e:  # pragma: no cover - compile stack unusable on this platform
        pytest.skip(f"torch._dynamo unavailable: {e}")
    finally:
        dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_train_isr_bakes_the_factors_into_the_training_ratios():
    torch.manual_seed(0)
    reduced = edaformer.create_model("edaformer-t-ade20k", num_classes=5, train_isr="2211-222").eval()
    assert str(reduced.train_isr) == "2211-222" and str(reduced.isr) == "1111-111"
    assert reduced.pool_ratios() == {"encoder.stage1": 16, "encoder.stage2": 8, "encoder.stage3": 2,
                                     "encoder.stage4": 1, "decoder.c2": 8, "decoder.c3": 4, "decoder.c4": 2}
    assert reduced.architecture_options() == dict(decoder_depths=[3, 2, 1], decoder_op="efa", train_isr="2211-222")
    # same weights: training-reduced at 1111-111 == the reference model at ISR 2211-222
    reference = edaformer.create_model("edaformer-t-ade20k", num_classes=5).eval()
    assert reference.state_dict().keys() == reduced.state_dict().keys()
    reference.load_state_dict(reduced.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad(), edaformer.isr(reference, "2211-222"):
        torch.testing.assert_close(reduced(x), reference(x))
        assert reduced.min_input_size() == reference.min_input_size() == (61, 61)
    # ISR at inference multiplies on top of the trained ratios
    with edaformer.isr(reduced, "2111-112"):
        assert reduced.pool_ratios()["encoder.stage1"] == 32 and reduced.pool_ratios()["decoder.c4"] == 4
        assert reduced.pool_ratios()["decoder.c2"] == 8


def test_bad_train_isr_names_the_option():
    with pytest.raises(ValueError, match="train_isr: ISR spec '2211-22': the decoder needs 3 factors"):
        edaformer.create_model("edaformer-t-ade20k", train_isr="2211-22")


def test_default_architecture_options(tiny):
    assert tiny.decoder_depths == (3, 2, 1) and tiny.decoder_op == "efa" and tiny.isr_pool == "avg"
    assert tiny.architecture_options() == dict(decoder_depths=[3, 2, 1], decoder_op="efa", train_isr="1111-111")


@pytest.mark.parametrize("options", [dict(decoder_depths=(1, 4, 1)), dict(decoder_op="conv"),
                                     dict(decoder_depths=[2, 0, 2], decoder_op="attention", train_isr="1111-222")])
def test_architecture_options_rebuild_the_model(options):
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3, **options)
    again = edaformer.create_model("edaformer-t-ade20k", num_classes=3, **model.architecture_options())
    assert again.architecture_options() == model.architecture_options()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_default_state_dict_keys_are_the_reference_layout(tiny):
    from edaformer.checkpoint import native_to_reference, reference_to_native

    keys = list(tiny.state_dict())
    reference = native_to_reference(tiny.state_dict())
    assert all(k.startswith(("backbone.", "decode_head.")) for k in reference)
    decoder_blocks = {k.split(".")[1] for k in reference if k.startswith("decode_head.attn")}
    assert decoder_blocks == {"attn4", "attn44", "attn444", "attn3", "attn33", "attn2"}
    assert not any(k.startswith("decode_head.c") and not k.startswith("decode_head.conv_seg") for k in reference)
    assert list(reference_to_native(reference)) == keys
    assert sum(k.startswith("decoder.") for k in keys) == 104 and len(keys) == 352


@pytest.mark.parametrize("name, digest", [("edaformer-t-ade20k", "3484677d7dbac109"),
                                          ("edaformer-b-ade20k", "f8144049ca4a9f8c")])
def test_default_state_dict_names_and_shapes_unchanged(name, digest):
    """Digest of the key / shape list the released checkpoints load into (taken before the ablation options)."""
    import hashlib

    with torch.device("meta"):
        sd = edaformer.create_model(name).state_dict()
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sd.items())
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


@requires_fixtures
def test_default_state_dict_keys_equal_the_released_checkpoint_keys():
    from edaformer.checkpoint import reference_to_native

    model = edaformer.create_model("edaformer-t-ade20k")
    released = reference_to_native({e["key"]: None for e in manifest("t")["state_dict"]})
    assert sorted(model.state_dict()) == sorted(released)
