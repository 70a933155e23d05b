"""benchmarks/reference_style.py: the baseline computes what edaformer computes, the reference's way."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import edaformer
from tests.helpers.reference import load_benchmark_module

reference_style = load_benchmark_module("reference_style")


@pytest.mark.parametrize("name,isr", [("edaformer-t-ade20k", "1111-111"), ("edaformer-t-ade20k", "2211-222"),
                                      ("edaformer-t-cityscapes", "2222-222"), ("edaformer-b-ade20k", "1111-222")])
def test_reference_style_baseline_matches(name, isr):
    torch.manual_seed(0)
    model = edaformer.create_model(name, isr=isr).eval()
    baseline = reference_style.from_model(model)
    assert set(baseline.state_dict()) == set(model.state_dict())  # same key names, loaded strictly
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, ref = model(x), baseline(x)
    assert ours.shape == ref.shape == (2, model.num_classes, 64, 96)
    assert (ours - ref).abs().max().item() <= 1e-4


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_reference_style_baseline_computes_attention_explicitly():
    load_benchmark_module("harness")  # reference_style.build imports it, as the scripts do
    baseline = reference_style.build("edaformer-t-ade20k", seed=0)
    rec = _OpNames()
    with torch.inference_mode(), rec:
        baseline(torch.randn(1, 3, 64, 64))
    assert "aten.scaled_dot_product_attention" not in rec.names
    assert "aten.softmax" in rec.names or "aten._softmax" in rec.names
