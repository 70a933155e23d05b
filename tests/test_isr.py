"""ISR specs (EDAFormer and per-stage forms) and the model-independent entry points set_isr / get_isr / isr."""
import pytest
import torch

import edaformer
from edaformer.isr import ISRSetting, get_isr, parse_stage_factors, set_isr



def test_parse_isr_forms():
    assert edaformer.parse_isr("2211-222") == edaformer.parse_isr(((2, 2, 1, 1), (2, 2, 2)))
    assert edaformer.parse_isr(" 4,2,2,1 - 2,2,2 ").encoder == (4, 2, 2, 1)
    assert str(edaformer.parse_isr(((16, 2, 1, 1), (2, 2, 2)))) == "16,2,1,1-2,2,2"


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
def test_bad_isr_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        edaformer.parse_isr(spec)




@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k", num_classes=5).eval()


@pytest.mark.parametrize("spec,factors", [
    ("2211", (2, 2, 1, 1)),
    (" 4121 ", (4, 1, 2, 1)),
    ("16,2,1,1", (16, 2, 1, 1)),
    ((2, 2, 1, 1), (2, 2, 1, 1)),
    ([1, 1, 1, 1], (1, 1, 1, 1)),
])
def test_parse_stage_factors_forms(spec, factors):
    assert parse_stage_factors(spec) == factors


def test_parse_stage_factors_follows_the_stage_count():
    assert parse_stage_factors("213", num_stages=3) == (2, 1, 3)
    with pytest.raises(ValueError, match="the encoder needs 3 factors, got 4"):
        parse_stage_factors("2211", num_stages=3)


@pytest.mark.parametrize("spec,match", [
    ("221", "the encoder needs 4 factors, got 3"),
    ("22111", "the encoder needs 4 factors, got 5"),
    ("", "the encoder needs 4 factors, got 0"),
    ("2201", "encoder factor 0 must be >= 1"),
    ("22a1", "expected 4 encoder digits, e.g. '2211'"),
    ("2211-222", "one factor per encoder stage and no decoder part"),
    (ISRSetting((2, 2, 1, 1), (2, 2, 2)), "no decoder part"),
    ((2, 2, 1, 1.5), "not a positive integer"),
    ((2, 2, True, 1), "not a positive integer"),
    (2211, "unsupported type int"),
])
def test_bad_stage_factor_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_stage_factors(spec)


def test_set_isr_delegates_to_edaformer(tiny):
    assert set_isr(tiny, "2211-222") is tiny
    assert get_isr(tiny) == ISRSetting((2, 2, 1, 1), (2, 2, 2))
    assert tiny.pool_ratios()["encoder.stage1"] == 16
    edaformer.set_isr(tiny, "1111-111")
    assert str(tiny.isr) == "1111-111"


def test_set_isr_sees_through_wrappers(tiny):
    wrapped = torch.nn.DataParallel(tiny)
    with edaformer.isr(wrapped, "2222-222") as m:
        assert m is wrapped and str(tiny.isr) == "2222-222"
    assert str(tiny.isr) == "1111-111"


def test_isr_context_restores_after_an_error(tiny):
    tiny.set_isr("2211-222")
    with pytest.raises(RuntimeError, match="inside"):
        with edaformer.isr(tiny, "2222-222"):
            assert str(tiny.isr) == "2222-222"
            raise RuntimeError("inside")
    assert str(tiny.isr) == "2211-222"
    tiny.set_isr("1111-111")


def test_isr_context_keeps_the_setting_when_the_spec_is_bad(tiny):
    with pytest.raises(ValueError, match="decoder needs 3 factors"):
        with edaformer.isr(tiny, "2211-22"):
            pass
    assert str(tiny.isr) == "1111-111"


def test_set_isr_rejects_unsupported_models():
    with pytest.raises(TypeError, match=r"Sequential is not a supported model: ISR works on EDAFormer, "
                                        r"transformers SegFormer .* timm PVTv2"):
        set_isr(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), "2211")


def test_isr_context_sets_and_restores_the_pool_kind(tiny):
    tiny.set_isr("1111-222", pool="max")
    with edaformer.isr(tiny, "2211-222", pool="overlap"):
        assert (str(tiny.isr), tiny.isr_pool) == ("2211-222", "overlap")
    assert (str(tiny.isr), tiny.isr_pool) == ("1111-222", "max")
    with pytest.raises(ValueError):
        with edaformer.isr(tiny, "2211-222", pool="median"):
            pass
    assert (str(tiny.isr), tiny.isr_pool) == ("1111-222", "max")
    tiny.set_isr("1111-111")
