"""The command line: help texts, -v, one error path for bad input, devices, checkpoint class counts."""
import argparse
import sys

import pytest
import torch

from edaformer import cli
from edaformer.cli import build_parser, list_models, main
from tests.helpers.checkpoints import random_checkpoint

NAME = "edaformer-t-ade20k"


pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# -- help ----------------------------------------------------------------------------------------
# Arguments of commands this test cannot fix from here; empty while every argument has a help.
HELP_ALLOWED_MISSING: set[str] = set()


def test_every_argument_has_a_help():
    parser = build_parser()
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in [("edaformer", parser), *_subparsers(parser).items()]
               for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not set(missing) - HELP_ALLOWED_MISSING, f"arguments without help: {', '.join(missing)}"


def test_top_level_help_is_the_description_not_a_docstring(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "EDAFormer semantic segmentation" in " ".join(out.split())
    assert "set_defaults" not in out and "_add_" not in out


def test_export_help_states_the_input_normalisation_and_resize_rule(capsys):
    from edaformer.data.transforms import MEAN, STD

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert str(tuple(MEAN)) in out and str(tuple(STD)) in out
    assert "(2048, 512)" in out and "multiple of 32" in out and "metadata_props" in out


@pytest.mark.parametrize("argv", [["list", "-v"], ["-v", "list"], ["list", "--verbose"]])
def test_verbose_before_or_after_the_command(argv, capsys):
    assert build_parser().parse_args(argv).verbose is True
    assert main(argv) == 0
    assert NAME in capsys.readouterr().out


# -- errors --------------------------------------------------------------------------------------
def _commands_with_device() -> set[str]:
    return {name for name, p in _subparsers(build_parser()).items()
            if any("--device" in a.option_strings for a in p._actions)}


DEVICE_ARGV = {
    "predict": ["predict", "image.png", "--model", NAME, "--checkpoint", "w.pth"],
    "train": ["train", "config.yaml"],
    "pretrain": ["pretrain", "config.yaml"],
    "eval": ["eval", "config.yaml", "--checkpoint", "w.pth"],
    "isr-tune": ["isr-tune", "config.yaml", "--checkpoint", "w.pth", "--max-drop", "1"],
    "bench": ["bench", NAME, "--size", "64", "64"],
}


def test_device_argv_covers_every_command_with_device():
    assert _commands_with_device() == set(DEVICE_ARGV)


@pytest.mark.parametrize("command", sorted(DEVICE_ARGV))
def test_cuda_without_cuda_is_one_clear_error(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(DEVICE_ARGV[command] + ["--device", "cuda"]) == 2
    (line,) = _error_lines(capsys)
    assert line == (f"edaformer {command}: error: device 'cuda' requested but CUDA is not available on this "
                    "machine (use --device cpu)")


def test_unexpected_error_without_traceback_unless_verbose(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something broke")

    monkeypatch.setattr(list_models, "run", broken)
    assert main(["list"]) == 1
    (line,) = _error_lines(capsys)
    assert line == "edaformer list: error: RuntimeError: something broke (rerun with -v for the traceback)"
    with pytest.raises(RuntimeError, match="something broke"):
        main(["list", "-v"])


def test_keyboard_interrupt_prints_on_a_fresh_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(list_models, "run", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


class _BrokenDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from edaformer.data import DatasetError

        raise DatasetError(f"/data/ann/{i}.png: label values 0..300 exceed the 150 classes")


def test_loader_worker_error_prints_the_original_message_only(monkeypatch, capsys):
    def load(args):
        for _ in torch.utils.data.DataLoader(_BrokenDataset(), num_workers=1):
            pass

    monkeypatch.setattr(list_models, "run", load)
    assert main(["list"]) == 2
    (line,) = _error_lines(capsys)
    assert line == "edaformer list: error: /data/ann/0.png: label values 0..300 exceed the 150 classes"


def test_error_message_keeps_plain_messages():
    assert cli.error_message(ValueError("a: b\n  c")) == "a: b\n  c"


def test_export_without_onnx_extras_gives_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    assert main(["export", NAME, "--checkpoint", str(tmp_path / "w.pth"), "--size", "64", "64",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    (line,) = _error_lines(capsys)
    assert line == ('edaformer export: error: ONNX export needs the onnx extras (onnxscript is not installed): '
                    'pip install "edaformer[onnx]"')


@pytest.mark.parametrize("kind", ["yaml", "directory"])
def test_checkpoint_that_is_not_a_checkpoint(kind, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    if kind == "yaml":
        path.write_text("model: {name: edaformer-t-ade20k}\n")
    else:
        path.mkdir()
    assert main(["export-reference", str(path), "--model", NAME, "--out", str(tmp_path / "r.pth")]) == 2
    (line,) = _error_lines(capsys)
    expected = "it is a YAML config, not a PyTorch checkpoint" if kind == "yaml" else "is a directory"
    assert line.startswith("edaformer export-reference: error: ") and expected in line and str(path) in line
    assert "weights_only" not in line


def test_config_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {NAME}}}\ndata: {{type: folder, root: r}}\nschedule: {{iters: 1}}\n")
    assert main(["train", str(cfg), "--set", "model.drop_path=0.1", "--device", "cpu"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("edaformer train: error: override 'model.drop_path=0.1': unknown key")
    assert "did you mean 'drop_path_rate'?" in line


# -- the checkpoint's class count -----------------------------------------------------------------
def test_export_reference_takes_the_checkpoint_class_count(tmp_path):
    model, ckpt = random_checkpoint(tmp_path / "seven.pth", NAME, num_classes=7)
    assert main(["export-reference", str(ckpt), "--model", NAME, "--out", str(tmp_path / "r.pth")]) == 0
    out = torch.load(tmp_path / "r.pth", weights_only=True)["state_dict"]
    assert torch.equal(out["decode_head.linear_pred.weight"], model.decoder.classifier.weight)


def test_a_closed_output_pipe_ends_quietly(monkeypatch, capsys):
    """`edaformer configs | head -1`: the reader leaves early; no error message, the shell's status."""
    import edaformer.cli.configs as configs_cli

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(configs_cli, "run", closed)
    assert main(["configs"]) == 141
    assert capsys.readouterr().err == ""
