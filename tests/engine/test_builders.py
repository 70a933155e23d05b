"""Optimizer parameter groups, the warmup + poly schedule and the loss."""
import pytest
import torch

import edaformer
from edaformer.config import ConfigError, validate_config
from edaformer.engine import WarmupPolyLR, build_optimizer, build_param_groups, build_scheduler, segmentation_loss


def test_schedule_values():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    sched = build_scheduler(opt, dict(iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, min_lr=0.0))
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(6e-5 * 1e-6)                     # warmup start
    assert lrs[5] == pytest.approx(6e-5 * 0.95 * (1 - 0.5 * (1 - 1e-6)))  # linear warmup on top of poly
    assert lrs[10] == pytest.approx(6e-5 * 0.9)                      # end of warmup: plain poly
    assert lrs[55] == pytest.approx(6e-5 * 0.45)
    assert lrs[100] == 0.0                                           # poly end
    f = WarmupPolyLR(1.0, 100, warmup_iters=0, power=2.0, min_lr=0.1)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.9 * 0.25 + 0.1) and f(100) == pytest.approx(0.1)


def test_poly_restarts_follow_a_continued_run():
    # a 10-iteration run continued to 40: decays to 0 at 10, then steps up onto the 40-iteration curve
    f = WarmupPolyLR(1.0, 40, warmup_iters=2, restarts=[10])
    short = WarmupPolyLR(1.0, 10, warmup_iters=2)
    assert [f(i) for i in range(10)] == [short(i) for i in range(10)]
    assert f(10) == pytest.approx(1 - 10 / 40) and f(39) == pytest.approx(1 / 40) and f(40) == 0.0
    assert [f(i) for i in range(10, 41)] == [WarmupPolyLR(1.0, 40, warmup_iters=2)(i) for i in range(10, 41)]
    # the same config shortened below the restart is a plain poly
    shortened = WarmupPolyLR(1.0, 8, warmup_iters=2, restarts=[10])
    assert [shortened(i) for i in range(9)] == [WarmupPolyLR(1.0, 8, warmup_iters=2)(i) for i in range(9)]


@pytest.mark.parametrize("restarts", [[50, 20], [20, 20], [0]])
def test_poly_restarts_checked(restarts):
    cfg = {"model": {"name": "edaformer-t-ade20k"}, "data": {"type": "folder", "root": "x"},
           "schedule": {"iters": 100, "restarts": restarts}}
    with pytest.raises(ConfigError, match="schedule.restarts"):
        validate_config(cfg)


def test_optim_impl_config():
    base = {"model": {"name": "edaformer-t-ade20k"}, "data": {"type": "folder", "root": "x"}, "schedule": {"iters": 9}}
    assert validate_config(base)["optim"]["impl"] == "auto"
    assert validate_config({**base, "optim": {"impl": "fused"}})["optim"]["impl"] == "fused"
    with pytest.raises(ConfigError, match="optim.impl must be one of auto, loop, foreach, fused, got 'fast'"):
        validate_config({**base, "optim": {"impl": "fast"}})


def test_param_groups():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    groups = build_param_groups(model, lr=6e-5, weight_decay=0.01, decoder_lr_mult=10)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    assert by_name["encoder"]["lr"] == by_name["encoder_no_decay"]["lr"] == 6e-5
    assert by_name["decoder"]["lr"] == by_name["decoder_no_decay"]["lr"] == pytest.approx(6e-4)
    assert by_name["encoder"]["weight_decay"] == by_name["decoder"]["weight_decay"] == 0.01
    assert by_name["encoder_no_decay"]["weight_decay"] == by_name["decoder_no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == model.no_weight_decay()
    assert "decoder.fuse.bn.weight" in no_decay and "encoder.stages.0.norm.bias" in no_decay
    assert "decoder.classifier.bias" not in no_decay                  # only normalization parameters
    assert all(names[id(p)].startswith("decoder.") for p in by_name["decoder"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, dict(lr=6e-5, betas=[0.9, 0.999], weight_decay=0.01, decoder_lr_mult=10))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4


def test_segmentation_loss_ignore():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    full = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none").sum() / labels.numel()
    assert segmentation_loss(logits, labels) == pytest.approx(full.item())
    assert segmentation_loss(logits, torch.full_like(labels, 255)) == 0.0


def test_segmentation_loss_keeps_float64_and_promotes_half():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, 4, 4))
    assert segmentation_loss(logits, labels).dtype == torch.float64
    assert segmentation_loss(logits.to(torch.bfloat16), labels).dtype == torch.float32


# -- model.init_from ----------------------------------------------------------------------------
NAME = "edaformer-t-ade20k"


def _trained_checkpoint(path, num_classes=4, seed=1):
    from edaformer.checkpoint import save_checkpoint
    from edaformer.engine.state import checkpoint_payload

    torch.manual_seed(seed)
    model = edaformer.create_model(NAME, num_classes=num_classes)
    save_checkpoint(checkpoint_payload(model, {"iteration": 160, "mIoU": 0.5}), path)
    return model


def test_init_from_loads_every_weight_strictly_and_logs_it(tmp_path, caplog):
    from edaformer.engine import build_model

    source = _trained_checkpoint(tmp_path / "trained.pth")
    caplog.set_level("INFO", logger="edaformer")
    model = build_model({"name": NAME, "init_from": str(tmp_path / "trained.pth"),
                         "encoder_weights": str(tmp_path / "never-read.pth")}, num_classes=4)
    expected = source.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    text = caplog.text
    assert f"all {len(expected)} tensors loaded" in text and "iteration 160" in text
    assert "model.encoder_weights" in text and "not loaded" in text


def test_init_from_is_skipped_without_init_weights(tmp_path):
    """A resumed run or an evaluation takes its weights elsewhere: the file is not even read."""
    from edaformer.engine import build_model

    model = build_model({"name": NAME, "num_classes": 4, "init_from": str(tmp_path / "missing.pth")}, 4,
                        init_weights=False)
    assert model.num_classes == 4


def test_another_class_count_loads_all_but_the_classifier_in_one_line(tmp_path, caplog):
    """Fine-tuning to other classes (timm's rule): every other tensor loaded, the classifier fresh,
    one line naming its tensors and shapes; init_from stays strict beyond the classifier."""
    from edaformer.checkpoint import CheckpointMismatchError, save_checkpoint
    from edaformer.engine import build_model

    path = tmp_path / "trained.pth"
    source = _trained_checkpoint(path, num_classes=4).state_dict()
    caplog.set_level("INFO", logger="edaformer")
    for key in ("init_from", "encoder_weights"):
        caplog.clear()
        torch.manual_seed(7)
        model = build_model({"name": NAME, key: str(path)}, num_classes=5)
        torch.manual_seed(7)
        fresh = edaformer.create_model(NAME, num_classes=5).state_dict()  # the classifier as initialised
        for name, tensor in model.state_dict().items():
            expected = fresh[name] if name.startswith("decoder.classifier.") else source[name]
            assert torch.equal(tensor, expected), name
        line = (f"model.{key} {path} was trained for 4 classes, this model has 5: {len(source) - 2} tensors loaded, "
                "the classifier re-initialised (decoder.classifier.weight (4, 128, 1, 1) -> (5, 128, 1, 1), "
                "decoder.classifier.bias (4,) -> (5,))")
        assert caplog.text.count(line) == 1 and "WARNING" not in caplog.text, caplog.text
    state = edaformer.create_model(NAME, num_classes=4, decoder_depths=[1, 1, 1]).state_dict()
    save_checkpoint({"state_dict": state}, tmp_path / "other-decoder.pth")
    with pytest.raises(CheckpointMismatchError, match=r"other-decoder\.pth \(trained for 4 classes; the model has 5\) "
                                                      r"does not match the model beyond its classifier: .* missing"):
        build_model({"name": NAME, "init_from": str(tmp_path / "other-decoder.pth")}, num_classes=5)


def test_init_from_errors_name_the_file(tmp_path):
    from edaformer.checkpoint import CheckpointMismatchError, save_checkpoint
    from edaformer.engine import build_model

    encoder = edaformer.create_model(NAME, num_classes=4).encoder.state_dict()
    save_checkpoint({"state_dict": encoder}, tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointMismatchError, match=r"imagenet\.pth holds no classifier.*model\.encoder_weights"):
        build_model({"name": NAME, "init_from": str(tmp_path / "imagenet.pth")}, num_classes=4)
    state = edaformer.create_model(NAME, num_classes=4).state_dict()
    del state["decoder.fuse.conv.weight"]
    save_checkpoint({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)partial\.pth.*missing keys.*decoder\.fuse\.conv\.weight"):
        build_model({"name": NAME, "init_from": str(tmp_path / "partial.pth")}, num_classes=4)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        build_model({"name": NAME, "init_from": str(tmp_path / "nothere.pth")}, num_classes=4)


def test_fresh_run_starts_from_init_from_and_a_resumed_run_from_its_checkpoint(tmp_path, caplog):
    """lr 0: the weights stay those loaded. The resume ignores a changed (here: missing) init_from."""
    from edaformer.config import load_config
    from edaformer.engine import train
    from tests.helpers.training_data import make_dataset, state, write_config

    source = _trained_checkpoint(tmp_path / "trained.pth")
    data = make_dataset(tmp_path / "data", n=2)
    cfg_path = write_config(tmp_path / "ft.yaml", data, model={"init_from": str(tmp_path / "trained.pth")},
                            optim={"lr": 0.0}, schedule={"iters": 1, "warmup_iters": 0},
                            train={"checkpoint_interval": 1, "deterministic": False})
    caplog.set_level("INFO", logger="edaformer")
    train(load_config(cfg_path), tmp_path / "run", device="cpu", verify_data="off")
    params = dict(source.named_parameters())
    first = state(tmp_path / "run" / "latest.pth")
    assert all(torch.equal(first["state_dict"][k], p) for k, p in params.items())
    assert "all 0 tensors" not in caplog.text and "init_from" in caplog.text
    caplog.clear()
    cfg = load_config(cfg_path, ["schedule.iters=2", f"model.init_from={tmp_path / 'gone.pth'}"])
    train(cfg, tmp_path / "run", resume="auto", device="cpu", verify_data="off")
    second = state(tmp_path / "run" / "latest.pth")
    assert second["iteration"] == 2 and "init_from" not in caplog.text
    assert all(torch.equal(second["state_dict"][k], p) for k, p in params.items())


def test_fine_tuning_the_shipped_camvid_model_to_four_classes(tmp_path, caplog):
    """init_from the shipped 11-class model into a 4-class model: all but the classifier loaded, two iterations."""
    from edaformer.checkpoint import load_checkpoint
    from edaformer.config import load_config
    from edaformer.engine import train
    from tests.helpers.training_data import make_dataset, state, write_config

    data = make_dataset(tmp_path / "data", n=2)
    cfg_path = write_config(tmp_path / "ft.yaml", data, model={"init_from": "edaformer-t-camvid"},
                            schedule={"iters": 2, "warmup_iters": 0}, train={"deterministic": False})
    caplog.set_level("INFO", logger="edaformer")
    result = train(load_config(cfg_path), tmp_path / "run", device="cpu", verify_data="off")
    assert result["iteration"] == 2
    assert caplog.text.count("model.init_from edaformer-t-camvid was trained for 11 classes, this model has 4: "
                             "350 tensors loaded, the classifier re-initialised (decoder.classifier.weight "
                             "(11, 128, 1, 1) -> (4, 128, 1, 1), decoder.classifier.bias (11,) -> (4,))") == 1
    trained = state(tmp_path / "run" / "latest.pth")["state_dict"]
    assert trained["decoder.classifier.weight"].shape == (4, 128, 1, 1)
    shipped = edaformer.create_model(NAME, num_classes=11)
    load_checkpoint(shipped, "edaformer-t-camvid")
    start, fresh = shipped.state_dict(), edaformer.create_model(NAME, num_classes=4).state_dict()
    for key in ("encoder.stages.0.downsample.proj.weight", "decoder.fuse.conv.weight"):
        assert (trained[key] - start[key]).abs().max() < 0.01 < (fresh[key] - start[key]).abs().max(), key
