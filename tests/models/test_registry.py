"""Named models: the list, class counts, parameter totals, unknown names."""
import pytest

import edaformer
from edaformer.models import MODEL_SPECS


def test_list_models():
    names = edaformer.list_models()
    assert names == sorted([f"edaformer-{s}-{d}" for s in "tb" for d in ("ade20k", "cityscapes", "cocostuff")]
                           + ["segformer-b0", "segformer-b1"])
    assert {n: MODEL_SPECS[n].num_classes for n in names if "-t-" in n} == {
        "edaformer-t-ade20k": 150, "edaformer-t-cityscapes": 19, "edaformer-t-cocostuff": 171}


@pytest.mark.parametrize("name,params", [("edaformer-t-ade20k", 4_929_914), ("edaformer-b-ade20k", 29_438_166)])
def test_param_counts_match_reference(name, params):
    model = edaformer.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params  # reference total minus the unused conv_seg


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'edaformer-x'"):
        edaformer.create_model("edaformer-x")


def test_create_with_isr():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4, isr="2211-222")
    assert str(model.isr) == "2211-222" and model.decoder.num_classes == 4


ABLATIONS = {
    "dec222": dict(decoder_depths=[2, 2, 2]),
    "dec123": dict(decoder_depths=[1, 2, 3]),
    "dec141": dict(decoder_depths=[1, 4, 1]),
    "op-attention": dict(decoder_op="attention"),
    "op-dwconv": dict(decoder_op="dwconv"),
    "op-conv": dict(decoder_op="conv"),
    "train-isr-2211-222": dict(train_isr="2211-222"),
}


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_ablation_configs_build_their_model(variant):
    import torch

    from edaformer.config import load_config
    from edaformer.engine import build_model
    cfg = load_config(f"ablations/edaformer-t-camvid-{variant}")  # shipped configs, by name
    base = load_config("edaformer-t-camvid")
    assert {k: v for k, v in cfg["model"].items() if k not in ABLATIONS[variant]} == base["model"]
    assert {k: cfg["model"][k] for k in ABLATIONS[variant]} == ABLATIONS[variant]
    with torch.device("meta"):
        model = build_model(cfg["model"], num_classes=11, init_weights=False)
    options = {**dict(decoder_depths=[3, 2, 1], decoder_op="efa", train_isr="1111-111"), **ABLATIONS[variant]}
    assert model.architecture_options() == options and model.decoder.num_classes == 11


def test_unknown_model_option_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown model option\(s\) 'decoder_depth'; known: .*decoder_depths"):
        edaformer.create_model("edaformer-t-ade20k", decoder_depth=(2, 2, 2))
