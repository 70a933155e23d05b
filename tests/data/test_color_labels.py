"""Colour label images to class ids: ``edaformer.data.color_labels`` and ``edaformer convert colors``."""
import numpy as np
import pytest
from PIL import Image

from edaformer.cli import main
from edaformer.data import colors_to_ids, convert_color_labels, ids_to_colors
from edaformer.data.palettes import get_dataset_info
from tests.helpers.training_data import CAMVID

CAMVID_PALETTE = [list(c) for c in get_dataset_info("camvid").palette]
FOUR = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]


def _read(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not available")
def test_camvid_ids_painted_in_its_palette_come_back(tmp_path, capsys):
    """CamVid ids 0-10 painted in the CamVid palette, void (11) in black, a colour of no class:
    converted with ignore value 11 they are the original labels again, the void pixels counted."""
    sources = sorted((CAMVID / "annotations" / "train").glob("*.png"))[:3]
    ids = {p.name: np.asarray(Image.open(p)) for p in sources}
    (tmp_path / "colour").mkdir()
    for name, label in ids.items():
        Image.fromarray(ids_to_colors(label, CAMVID_PALETTE)).save(tmp_path / "colour" / name)
    void = sum(int((label == 11).sum()) for label in ids.values())
    assert void > 0
    argv = ["convert", "colors", "--root", str(tmp_path / "colour"), "--palette", "camvid", "--ignore-index", "11",
            "--out", str(tmp_path / "ids")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"colors: wrote 3 class-id label files under {tmp_path / 'ids'} (0 existing skipped); {void} pixels in " \
           f"3 files had a colour not in the palette and became 11 (ignore): [0, 0, 0] x {void}" in out
    for name, label in ids.items():
        mode, back = _read(tmp_path / "ids" / name)
        assert mode == "L" and np.array_equal(back, label)
    # the palette and the ignore value of a training config; written beside the colour labels
    assert main(["convert", "colors", str(tmp_path / "colour"), "--config", "edaformer-t-camvid"]) == 0
    for name, label in ids.items():
        assert np.array_equal(_read(tmp_path / "colour" / name.replace(".png", "_ids.png"))[1], label)
    capsys.readouterr()
    assert main(["convert", "colors", str(tmp_path / "colour"), "--config", "edaformer-t-camvid",
                 "--skip-existing"]) == 0  # the written *_ids.png files are no sources
    assert f"wrote 0 class-id label files under {tmp_path / 'colour'} (3 existing skipped)" in capsys.readouterr().out


def test_unknown_colours_become_the_ignore_value_and_are_counted():
    ids = np.array([[0, 1, 2, 3]] * 3, np.uint8)
    rgb = ids_to_colors(ids, FOUR)
    rgb[0, :2] = (7, 7, 7)
    rgb[2, 3] = (1, 2, 3)
    got, unknown = colors_to_ids(rgb, FOUR)
    expected = ids.copy()
    expected[0, :2], expected[2, 3] = 255, 255
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    assert unknown == {(7, 7, 7): 2, (1, 2, 3): 1}
    with pytest.raises(ValueError, match=r"one colour to two classes \(\[\(255, 0, 0\)\]\)"):
        colors_to_ids(rgb, FOUR + [[255, 0, 0]])
    with pytest.raises(ValueError, match=r"ignore value 3 must be in \[4, 255\]"):
        colors_to_ids(rgb, FOUR, ignore_index=3)


def test_a_bad_file_is_reported_and_the_others_converted(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    Image.fromarray(ids_to_colors(np.array([[1, 2], [3, 0]], np.uint8), FOUR)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a" / "grey.png")  # already ids
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    result = convert_color_labels(tmp_path, FOUR, out=tmp_path / "out")
    assert result.written == 1 and np.array_equal(_read(tmp_path / "out" / "a" / "x.png")[1], [[1, 2], [3, 0]])
    assert len(result.failed) == 2 and any("grey.png is not a colour label (mode L)" in f for f in result.failed)
    assert main(["convert", "colors", str(tmp_path / "a"), "--palette", "[[0,0,0],[255,0,0],[0,255,0],[0,0,255]]",
                 "--out", str(tmp_path / "out2")]) == 1
    captured = capsys.readouterr()
    assert "colors: wrote 1 class-id label files" in captured.out and captured.err.count("error:") == 2
    assert main(["convert", "colors", str(tmp_path / "a")]) == 2
    assert "needs the label colours: --palette or --config" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: edaformer-t-ade20k}\ndata: {type: folder, root: r, classes: 4}\n"
                      "schedule: {iters: 1}\n")
    assert main(["convert", "colors", str(tmp_path / "a"), "--config", str(config)]) == 2
    assert "c.yaml sets no data.palette" in capsys.readouterr().err
