"""Named models: the list, class counts, parameter totals, unknown names."""
import pytest

import edaformer
from edaformer.models import MODEL_SPECS


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


def test_create_with_isr():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4, isr="2211-222")
    assert str(model.isr) == "2211-222" and model.decoder.num_classes == 4
