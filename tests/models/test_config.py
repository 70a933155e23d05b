"""The model config: a round trip through plain data, every named model built from its config,
refused keys and choices, and the choice lists defined once."""
import json
import re
from pathlib import Path

import pytest
import torch

import edaformer
from edaformer.cli import build_parser
from edaformer.config import KEYS
from edaformer.models import (DECODER_OPS, ISR_POOLS, MODEL_SPECS, TEST_MODES, EDAFormer, EDAFormerConfig,
                              HFSegFormerConfig, create_model)
from edaformer.models import config as model_config

SRC = Path(edaformer.__file__).parent


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_round_trip_through_plain_data(name):
    config = MODEL_SPECS[name]
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config
    assert data["name"] == name and data["num_classes"] == config.num_classes


@pytest.mark.parametrize("name", [n for n in sorted(MODEL_SPECS) if MODEL_SPECS[n].family == "edaformer"])
def test_every_named_model_is_built_from_its_config(name):
    with torch.device("meta"):
        model = create_model(name)
        direct = EDAFormer(MODEL_SPECS[name])
    assert model.config == MODEL_SPECS[name] and model.name == name and model.spec is model.config
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    assert model.encoder.stages[0].downsample.proj.out_channels == model.config.embed_dims[0]


def test_options_are_kept_in_the_config():
    with torch.device("meta"):
        model = create_model("edaformer-t-cityscapes", num_classes=3, decoder_op="conv", isr_pool="max")
    assert (model.config.num_classes, model.config.decoder_op, model.config.isr_pool) == (3, "conv", "max")
    assert model.isr_pool == "max" and model.config.test_mode == "slide"
    rebuilt = EDAFormer(EDAFormerConfig.from_dict(model.config.to_dict()))
    assert rebuilt.config == model.config and rebuilt.isr_pool == "max"


def test_name_and_config_are_read_only():
    with torch.device("meta"):
        model = EDAFormer(decoder_depths=(1, 1, 1))
    assert model.name is None and model.config.decoder_depths == (1, 1, 1)
    for attribute in ("name", "spec", "config"):
        with pytest.raises(AttributeError):
            setattr(model, attribute, None)
    with pytest.raises(Exception, match="cannot assign"):
        model.config.num_classes = 3


def test_unknown_key_is_refused_by_name():
    data = dict(EDAFormerConfig().to_dict(), decoder_width=64)
    with pytest.raises(ValueError, match=r"unknown EDAFormerConfig key\(s\) 'decoder_width'; known: .*decoder_dim"):
        EDAFormerConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"unknown EDAFormerConfig key\(s\) 'ops'"):
        EDAFormerConfig().replace(ops="efa")
    with pytest.raises(ValueError, match=r"unknown HFSegFormerConfig key\(s\) 'decoder_op'"):
        HFSegFormerConfig.from_dict({"decoder_op": "efa"})


@pytest.mark.parametrize("changes,message", [
    (dict(decoder_op="mlp"), "unknown decoder_op 'mlp'; choose one of efa, attention, dwconv, conv"),
    (dict(isr_pool="mean"), "unknown ISR pool 'mean'; choose one of avg, max, overlap, merge"),
    (dict(test_mode="tiles"), "unknown test_mode 'tiles'; choose one of whole, slide"),
    (dict(train_isr="2211-22"), "train_isr: ISR spec '2211-22'"),
    (dict(decoder_depths=(3, 2)), r"decoder_depths must be 3 integers >= 0"),
    (dict(embed_dims=(32, 64, 128)), r"embed_dims must be 4 integers >= 1"),
    (dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(crop_size=(512,)), "crop_size must be 2 integers > 0"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        EDAFormerConfig(**changes)


def test_segformer_config_checks_its_size_and_options():
    assert HFSegFormerConfig(size="b1", options={"depths": [1, 1, 1, 1]}).segformer_options()["depths"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown SegFormer size 'b9'"):
        HFSegFormerConfig(size="b9")
    with pytest.raises(ValueError, match=r"unknown SegformerConfig option\(s\) 'decoder_op'"):
        HFSegFormerConfig(options={"decoder_op": "efa"})


def test_the_choice_lists_are_written_once():
    assert model_config.ISR_POOLS is ISR_POOLS and model_config.DECODER_OPS is DECODER_OPS
    written = {"pool kinds": re.compile(r"""["']avg["'],\s*["']max["'],\s*["']overlap["'],\s*["']merge["']"""),
               "decoder ops": re.compile(r"""["']efa["'],\s*["']attention["'],\s*["']dwconv["'],\s*["']conv["']"""),
               "test modes": re.compile(r"""["']whole["'],\s*["']slide["']""")}
    places = {what: sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if pattern.search(p.read_text()))
              for what, pattern in written.items()}
    assert places == {"pool kinds": ["models/reduction.py"], "decoder ops": ["models/mixers.py"],
                      "test modes": ["models/config.py"]}
    # the config keys and the command-line options take them
    assert KEYS["model"]["isr_pool"].type.choices == ISR_POOLS
    assert KEYS["model"]["decoder_op"].type.choices == DECODER_OPS
    assert KEYS["eval"]["mode"].type.choices == TEST_MODES
    parser = build_parser()
    flops = parser._subparsers._group_actions[0].choices["flops"]
    assert {a.dest: tuple(a.choices) for a in flops._actions if a.dest in ("pool", "decoder_op")} == {
        "pool": ISR_POOLS, "decoder_op": DECODER_OPS}
