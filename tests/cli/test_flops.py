"""``edaformer flops``: the table and JSON line, conventions, class counts, model options, errors."""
import json
import re

import pytest

from edaformer.cli import main

NAME = "edaformer-t-ade20k"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_json(capsys):
    assert main(["flops", NAME, "--size", "512", "512", "--isr", "2211-222", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("GFLOPs" in line for line in out[:-1])
    d = json.loads(out[-1])
    assert d["params"] == 4949264 and d["params_excluding_conv_seg"] == 4929914
    assert round(d["gflops"], 2) == 4.71
    assert d["isr"] == "2211-222" and d["input_size"] == [512, 512] and d["convention"] == "mmcv130"


def test_flops_convention_and_classes(capsys):
    argv = ["flops", NAME, "--size", "512", "512", "--num-classes", "19", "--convention", "mmcv127", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["convention"] == "mmcv127" and "LayerNorm" in d["uncounted"]
    assert d["params"] == 4949264 - 2 * (150 - 19) * 129  # classifier and conv_seg: 129 per class each


def test_flops_counts_pool_kinds_and_decoder_variants(capsys):
    def gflops(*extra):
        assert main(["flops", NAME, "--size", "128", "128", "--isr", "2211-222", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gflops"]

    avg = gflops()
    assert gflops("--pool", "max") == avg
    assert gflops("--pool", "merge") > avg
    assert gflops("--decoder-op", "attention") > avg > gflops("--decoder-op", "dwconv")
    assert gflops("--decoder-depths", "1", "2", "3") != avg
    assert gflops("--train-isr", "2211-222", "--isr", "1111-111") == avg


def test_flops_of_a_segformer(capsys):
    """SegFormer-B0, 150 classes, 512x512: the table shows the published 8.4 GFLOPs."""
    pytest.importorskip("transformers", reason="SegFormer models need the 'hf' extra (transformers)")
    assert main(["flops", "segformer-b0", "--size", "512", "512"]) == 0
    assert re.search(r"GFLOPs\s+8\.42\n", capsys.readouterr().out)


@pytest.mark.parametrize("spec, message", [("4444-444", "does not fit"), ("22x1-222", "ISR spec")])
def test_flops_errors(capsys, spec, message):
    assert main(["flops", NAME, "--size", "64", "64", "--isr", spec]) == 2
    err = capsys.readouterr().err
    assert "edaformer flops: error:" in err and message in err
