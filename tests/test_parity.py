"""Exact parity with the reference implementation's outputs (../shared/fixtures/official)."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

import edaformer
from tests.helpers.reference import MODELS, SETTINGS, expected_outputs, inputs, manifest, reference_state_dict, requires_fixtures

pytestmark = requires_fixtures
F32_TOL = 2e-5
F64_TOL = 1e-9


@pytest.fixture(scope="module", params=["t", "b"])
def loaded(request):
    size = request.param
    model = edaformer.create_model(MODELS[size]).eval()
    report = edaformer.load_checkpoint(model, {"state_dict": reference_state_dict(size), "meta": {}}, strict=True)
    assert report["format"] == "reference"
    return size, model


def test_weight_rule_matches_manifest_hashes():
    sd = reference_state_dict("t")
    for entry in manifest("t")["state_dict"][:40]:
        digest = hashlib.sha256(sd[entry["key"]].contiguous().numpy().tobytes()).hexdigest()
        assert digest == entry["sha256"], entry["key"]


def test_inputs_match_manifest_hashes():
    for name, x in inputs().items():
        assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == manifest("t")["inputs"][name]["sha256"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_float32_parity(loaded, setting):
    size, model = loaded
    expected = expected_outputs(size)
    model.set_isr(SETTINGS[setting])
    for xname, x in inputs().items():
        key = f"{xname}.{setting}."
        with torch.no_grad():
            stages = model.forward_features(x)
            logits = model.decoder(stages[1:])
            full = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        assert (logits - expected[key + "logits"]).abs().max().item() <= F32_TOL
        if size == "t":
            for i, stage in enumerate(stages):
                assert (stage[0] - expected[key + f"stage{i + 1}"]).abs().max().item() <= F32_TOL, f"stage{i + 1}"
            assert (full[:, :3, :48, :48] - expected[key + "fullres_crop"]).abs().max().item() <= F32_TOL
            with torch.no_grad():
                assert torch.equal(model(x), full)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_float64_parity(loaded, setting):
    size, model = loaded
    expected = expected_outputs(size)
    model64 = model.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float64 depthwise convs run one small kernel per channel: no thread hand-offs
    try:
        model64.set_isr(SETTINGS[setting])
        for xname, x in inputs().items():
            with torch.no_grad():
                logits = model64.decode(x.double())[:, :8]
            assert (logits - expected[f"{xname}.{setting}.logits_f64_ch0to7"]).abs().max().item() <= F64_TOL
    finally:
        torch.set_num_threads(threads)
        model.float()


def test_pool_geometry_matches_manifest(loaded):
    size, model = loaded
    for setting, spec in SETTINGS.items():
        model.set_isr(spec)
        for xname, x in inputs().items():
            geometry = manifest(size)["settings"][setting]["per_input"][xname]["avgpool_geometry"]
            ratios = [m.pool_ratio for _, m in model.attention_layers()]
            # reference order: encoder blocks, then decoder attn4, attn44, attn444, attn3, attn33, attn2
            names = [n for n, _ in model.attention_layers()]
            order = [i for i, n in enumerate(names) if n.startswith("encoder")]
            order += [names.index(f"decoder.c{lvl}.{j}.attn") for lvl, d in ((4, 3), (3, 2), (2, 1)) for j in range(d)]
            assert [ratios[i] for i in order] == [g["kernel"] for g in geometry]
