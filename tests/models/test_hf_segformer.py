"""SegFormer (transformers) as a registered segmentor: sizes, forward, ISR, FLOPs, training and
evaluation through the same engine as EDAFormer (tiny variants and 64x64 images)."""
import re

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers", reason="SegFormer models need the 'hf' extra (transformers)")

import edaformer  # noqa: E402
from edaformer.cli import main as cli_main  # noqa: E402
from edaformer.config import ConfigError, load_config  # noqa: E402
from edaformer.engine import build_model, evaluate, train  # noqa: E402
from edaformer.engine.builders import build_datasets, build_param_groups  # noqa: E402
from edaformer.flops import count_flops  # noqa: E402
from edaformer.isr import get_isr  # noqa: E402
from edaformer.inference import Segmenter, TestProtocol  # noqa: E402
from edaformer.checkpoint import load_checkpoint  # noqa: E402
from edaformer.data import eval_transforms  # noqa: E402
from tests.helpers.training_data import CLASSES, DEFAULT_YAML, make_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
            decoder_hidden_size=16)


def tiny(num_classes: int = 3, **options) -> torch.nn.Module:
    """A tiny SegFormer with weights of std 0.2 (the std-0.02 init makes attention so uniform that
    pooling the keys / values would hardly change the output)."""
    torch.manual_seed(0)
    model = edaformer.create_model("segformer-b0", num_classes=num_classes, **{**TINY, **options})
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def run(model, x):
    with torch.no_grad():
        return model(x)


# -- the model ------------------------------------------------------------------------------------
def test_b0_is_the_published_configuration():
    with torch.device("meta"):
        model = edaformer.create_model("segformer-b0")
    cfg = model.config
    assert (cfg.hidden_sizes, cfg.depths, cfg.num_attention_heads, cfg.sr_ratios) == (
        [32, 64, 160, 256], [2, 2, 2, 2], [1, 2, 5, 8], [8, 4, 2, 1])
    assert (cfg.decoder_hidden_size, cfg.drop_path_rate, cfg.classifier_dropout_prob) == (256, 0.1, 0.1)
    assert model.num_classes == 150 and model.name == "segformer-b0" and model.spec.dataset == "ade20k"
    assert sum(p.numel() for p in model.parameters()) == 3_752_694  # published: 3.8 M
    assert "segformer-b0" in edaformer.list_models() and "segformer-b1" in edaformer.list_models()
    with torch.device("meta"):
        b1 = edaformer.create_model("segformer-b1", num_classes=11)
    assert b1.config.hidden_sizes == [64, 128, 320, 512] and b1.num_classes == 11


def test_forward_gives_logits_at_the_input_size():
    model = tiny(num_classes=5).train()
    x = torch.randn(2, 3, 40, 56)
    logits = model(x)
    assert logits.shape == (2, 5, 40, 56) and logits.dtype == torch.float32
    logits.logsumexp(1).mean().backward()
    assert model.encoder.stages[0].patch_embeddings.proj.weight.grad is not None
    assert model.decoder.classifier.weight.grad is not None
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\), got \(2, 1, 40, 56\)"):
        model(torch.randn(2, 1, 40, 56))


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        model = tiny(drop_path_rate=0.0, dropout=0.0).train()
        model.set_grad_checkpointing(enable)
        model(torch.ones(1, 3, 32, 32)).square().mean().backward()
        grads.append(model.encoder.stages[0].blocks[0].attention.q_proj.weight.grad)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.encoder.modules())
    torch.testing.assert_close(grads[0], grads[1])


def test_state_dict_reads_as_this_librarys_format():
    """encoder.* / decoder.* keys: the native checkpoint format, the classifier found for the class
    count, the head in the decoder's 10x learning-rate groups, norms without weight decay."""
    model = tiny(num_classes=7)
    keys = list(model.state_dict())
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert edaformer.checkpoint.checkpoint_num_classes({"state_dict": model.state_dict()}) == 7
    groups = {g["name"]: g for g in build_param_groups(model, 1e-4, 0.01)}
    assert groups["decoder"]["lr"] == pytest.approx(1e-3) and groups["encoder"]["lr"] == pytest.approx(1e-4)
    assert any(p is model.decoder.batch_norm.weight for p in groups["decoder_no_decay"]["params"])
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("options, message", [
    (dict(decoder_op="conv"), r"segformer-b0 does not take model option\(s\) 'decoder_op' \(EDAFormer options\)"),
    (dict(decoder_drop_path=0.1), r"'decoder_drop_path' \(EDAFormer options\)"),
    (dict(train_isr="2211-222"), r"'train_isr'"),
    (dict(sr_ratio=[8, 4, 2, 1]), r"'sr_ratio'; known: drop_path_rate, dropout, in_chans, hidden_sizes"),
])
def test_edaformer_and_unknown_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        edaformer.create_model("segformer-b0", num_classes=3, **options)


def test_missing_transformers_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=re.escape("pip install edaformer[hf]")):
        edaformer.create_model("segformer-b0", num_classes=3)


# -- ISR ------------------------------------------------------------------------------------------
def test_isr_factor_one_is_bit_identical_and_2211_changes_the_output():
    model = tiny()
    x = torch.randn(1, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = run(model, x)
    model.set_isr("2211")
    reduced = run(model, x)
    assert model.isr == edaformer.parse_isr("2211-111") and str(model.isr) == "2211-111"
    assert (reduced - reference).abs().max() > 1e-2
    model.set_isr("1111")
    assert torch.equal(run(model, x), reference)
    edaformer.set_isr(model, "2211-222")  # the decoder part has no effect: the MLP head has no attention
    assert torch.equal(run(model, x), reduced) and str(get_isr(model)) == "2211-111"
    with edaformer.isr(model, (1, 1, 1, 1)):
        assert torch.equal(run(model, x), reference)
    assert str(model.isr) == "2211-111"
    edaformer.set_isr(model, "1111-111")
    assert torch.equal(run(model, x), reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_isr_gflops_drop():
    model = tiny()
    full = count_flops(model, (64, 64))
    with edaformer.isr(model, "2211"):
        reduced = count_flops(model, (64, 64))
        assert reduced.isr == "2211-111" and reduced.pool_ratios == {
            "encoder.stage1": 16, "encoder.stage2": 8, "encoder.stage3": 2, "encoder.stage4": 1}
    assert full.isr == "1111-111" and reduced.gflops < full.gflops
    first = full.attention[0], reduced.attention[0]  # stage 1 at 64x64: a 16x16 grid, reduced by 8, pooled by 2
    assert [(t.query_hw, t.kv_hw, t.pool_ratio, t.kv_tokens) for t in first] == [((16, 16), (2, 2), 8, 4),
                                                                                  ((16, 16), (1, 1), 16, 1)]
    by_stage = lambda r: r.attention_by_group()  # noqa: E731
    assert by_stage(reduced)["encoder.stage1"] == by_stage(full)["encoder.stage1"] / 4
    assert by_stage(reduced)["encoder.stage3"] == by_stage(full)["encoder.stage3"]


@pytest.mark.parametrize("spec, pool, message", [
    ("22", "avg", r"the encoder needs 4 factors, got 2"),
    ("2211-22", "avg", r"the decoder needs 3 factors, got 2"),
    ("2211", "max", r"ISR pool 'max' is available for EDAFormer models only"),
])
def test_bad_isr_is_refused_and_changes_nothing(spec, pool, message):
    model = tiny().set_isr("2111")
    with pytest.raises(ValueError, match=message):
        model.set_isr(spec, pool=pool)
    assert str(model.isr) == "2111-111"


def test_min_input_size_is_exact():
    model = tiny()
    for spec, expected in (("1111", 29), ("2211", 61), ("1114", 97)):
        model.set_isr(spec)
        assert model.min_input_size() == (expected, expected)
        run(model, torch.randn(1, 3, expected, expected + 3))
        with pytest.raises((ValueError, RuntimeError)):
            run(model, torch.randn(1, 3, expected - 1, expected + 3))
        with pytest.raises(ValueError, match=f"SegFormer needs at least {expected}x{expected}"):
            count_flops(model, (expected - 1, 64))


def test_flops_of_b0_match_the_published_figure():
    """SegFormer-B0, 150 classes, 512x512: 8.4 GFLOPs published (BatchNorm2d, 0.008, not counted)."""
    with torch.device("meta"):
        model = edaformer.create_model("segformer-b0")
    report = count_flops(model, (512, 512))
    assert round(report.gflops, 1) == 8.4 and report.params == 3_752_694
    assert report.flops_by_convention["mmcv127"] == report.flops - report.by_type["LayerNorm"]
    assert report.uncounted == {"BatchNorm2d": 2 * 256 * 128 * 128}
    assert count_flops(model, (512, 512), convention="mmcv127").by_type.keys() == {"Conv2d", "Linear", "ReLU"}


# -- training and evaluation ------------------------------------------------------------------------
def _config(tmp_path, data_root, **model):
    cfg = {
        "_base_": str(DEFAULT_YAML),
        "model": {"name": "segformer-b0", "num_classes": 4, "drop_path_rate": 0.0, "dropout": 0.0, **model},
        "data": {"type": "folder", "root": str(data_root), "classes": CLASSES, "img_suffix": ".png",
                 "scale": [64, 64], "ratio_range": [1.0, 1.0], "crop_size": [64, 64], "cat_max_ratio": 1.0,
                 "flip_prob": 0.0, "photometric": False, "batch_size": 2, "workers": 0},
        "schedule": {"iters": 2, "warmup_iters": 0},
        "train": {"checkpoint_interval": 2, "eval_interval": 0, "log_interval": 1, "deterministic": True},
    }
    path = tmp_path / "segformer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_camvid_config_resolves_to_segformer_b0():
    cfg = load_config("ablations/segformer-b0-camvid")
    reference = load_config("edaformer-t-camvid")
    assert cfg["model"]["name"] == "segformer-b0" and cfg["model"]["num_classes"] == 11
    assert cfg["model"]["drop_path_rate"] == 0.1
    assert {k: cfg[k] for k in ("data", "optim", "schedule", "train")} == {
        k: reference[k] for k in ("data", "optim", "schedule", "train")}
    with torch.device("meta"):
        model = build_model(cfg["model"], 11, init_weights=False)
    assert model.config.drop_path_rate == 0.1 and model.num_classes == 11


def test_edaformer_only_config_key_is_refused(tmp_path):
    cfg = load_config(_config(tmp_path, tmp_path / "data", decoder_op="conv"))
    with pytest.raises(ValueError, match=r"segformer-b0 does not take model option\(s\) 'decoder_op'"):
        build_model(cfg["model"], 4, init_weights=False)


def test_eval_isr_takes_an_encoder_only_setting(tmp_path):
    cfg = load_config(_config(tmp_path, tmp_path / "data"), ["eval.isr=2211"])
    assert cfg["eval"]["isr"] == "2211-111"
    with pytest.raises(ConfigError, match="eval.isr must be an ISR setting"):
        load_config(_config(tmp_path, tmp_path / "data"), ["eval.isr=221"])


def test_train_two_iterations_then_evaluate_predict_and_sweep(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2, size=64)
    cfg_path = _config(tmp_path, data)
    work = tmp_path / "work"
    result = train(load_config(cfg_path), work, device="cpu")
    assert result["iteration"] == 2 and np.isfinite(result["metrics"]["mIoU"])
    checkpoint = work / "latest.pth"
    assert checkpoint.is_file() and (work / "iter_2.pth").is_file()

    # evaluate: the config's model with the checkpoint's weights
    cfg = load_config(work / "config.yaml")
    _, val_set = build_datasets(cfg["data"])
    model = build_model(cfg["model"], val_set.num_classes, init_weights=False)
    report = load_checkpoint(model, checkpoint)
    assert report["format"] == "edaformer" and not report["missing"]
    protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg))
    val_set.transforms = eval_transforms(protocol.scale, protocol.size_divisor)
    metrics = evaluate(model, val_set, protocol, workers=0)
    assert metrics["num_images"] == 2 and metrics["mIoU"] == pytest.approx(result["metrics"]["mIoU"])
    reduced = evaluate(model, val_set, protocol, isr="2211", workers=0)
    assert reduced["num_images"] == 2 and str(model.isr) == "1111-111"

    # predict
    segmenter = Segmenter.from_checkpoint("segformer-b0", checkpoint, device="cpu", isr="2211")
    label = segmenter(np.zeros((64, 64, 3), np.uint8))
    assert label.shape == (64, 64) and segmenter.num_classes == 4 and segmenter.classes == tuple(CLASSES)
    assert str(segmenter.model.isr) == "2211-111"

    # the command line: eval at one setting, and the sweep with its GFLOPs
    capsys.readouterr()
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(checkpoint), "--isr", "2211", "--device", "cpu"]) == 0
    assert "ISR 2211-111 (avg pooling)  images 2" in capsys.readouterr().out
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(checkpoint), "--device", "cpu", "--out",
                     str(tmp_path / "sweep"), "--isr-sweep", "1111-111", "2211-111"]) == 0
    rows = yaml.safe_load((tmp_path / "sweep" / "isr_sweep.json").read_text())["results"]
    assert [r["isr"] for r in rows] == ["1111-111", "2211-111"] and rows[1]["gflops"] < rows[0]["gflops"]


def test_export_and_encoder_weights_refuse_segformer_in_one_line(tmp_path):
    from edaformer.engine.builders import build_model
    from edaformer.export import export_onnx

    model = edaformer.create_model("segformer-b0", num_classes=3)
    with pytest.raises(ValueError, match="ONNX export takes EDAFormer models, not SegFormer"):
        export_onnx(model, tmp_path / "m.onnx", (64, 64))
    with pytest.raises(ValueError, match="segformer-b0 is not an EDAFormer model"):
        build_model({"name": "segformer-b0", "encoder_weights": str(tmp_path / "eft.pth")}, 3)
