"""CPU fast paths: the scoped option, banded FFN and huge-page resize give the plain results."""
import ast
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import edaformer
from edaformer.models import efa, fastpath

PACKAGE = Path(edaformer.__file__).resolve().parent


@pytest.fixture(scope="module")
def model_t():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k").eval()


# -- the option ------------------------------------------------------------------------------------
def test_defaults_keep_banded_ffn_on_and_huge_pages_off():
    opts = fastpath.get_options()
    assert opts == fastpath.FastPathOptions()
    assert opts.ffn_band_tokens == 4096 and opts.huge_pages is False


def test_options_are_scoped_and_nest():
    before = fastpath.get_options()
    with fastpath.options(ffn_band_tokens=None) as outer:
        assert outer is fastpath.get_options() and outer.ffn_band_tokens is None and not outer.huge_pages
        with fastpath.options(huge_pages=True):
            assert fastpath.get_options() == fastpath.FastPathOptions(ffn_band_tokens=None, huge_pages=True)
        assert fastpath.get_options() == outer
    assert fastpath.get_options() == before


def test_options_restored_on_exception():
    before = fastpath.get_options()
    with pytest.raises(RuntimeError, match="boom"):
        with fastpath.options(ffn_band_tokens=8, huge_pages=True):
            raise RuntimeError("boom")
    assert fastpath.get_options() == before


def test_options_do_not_leak_into_other_threads():
    seen = []
    with fastpath.options(ffn_band_tokens=None):
        t = threading.Thread(target=lambda: seen.append(fastpath.get_options()))
        t.start()
        t.join()
    assert seen == [fastpath.FastPathOptions()]


@pytest.mark.parametrize("changes, match", [
    (dict(ffn_band_token=8), "unknown fast-path option.*ffn_band_token"),
    (dict(ffn_band_tokens=0), "ffn_band_tokens must be a positive integer or None"),
    (dict(ffn_band_tokens=True), "ffn_band_tokens"),
    (dict(huge_pages=1), "huge_pages must be True or False"),
    (dict(huge_page_min_bytes=-1), "huge_page_min_bytes"),
])
def test_bad_options(changes, match):
    before = fastpath.get_options()
    with pytest.raises(ValueError, match=match):
        with fastpath.options(**changes):
            pass
    assert fastpath.get_options() == before


def _environment_reads_at_import(tree: ast.AST) -> list[int]:
    """Lines that read ``os.environ`` / ``os.getenv`` in code that runs at import (not in function bodies)."""
    hits = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                if child is not None:
                    visit(child)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            hits.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(a.name in ("environ", "getenv") for a in node.names):
            hits.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return hits


def test_environment_scan_finds_module_level_reads():
    src = "import os\nX = os.environ.get('A')\ndef f(y=os.getenv('B')):\n    return os.environ['C']\n"
    assert _environment_reads_at_import(ast.parse(src)) == [2, 3]


def test_no_module_reads_the_environment_at_import():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _environment_reads_at_import(ast.parse(path.read_text(encoding="utf-8")))
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert offenders == {}


# -- banded ConvFFN --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 96), (130, 70)])
def test_banded_ffn_matches_whole_map(model_t, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with fastpath.options(ffn_band_tokens=None):
            whole = model_t(x)
        with fastpath.options(ffn_band_tokens=40):  # bands of 4 rows in every stage
            banded = model_t(x)
    # the same products summed in the same order, but BLAS may round a smaller matrix product
    # differently in the last bit: parity-level tolerance
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-5)


def test_banded_ffn_only_without_autograd():
    ffn = efa.ConvFFN(8, 16, relu=True)
    x = torch.randn(2, 90, 8)
    with fastpath.options(ffn_band_tokens=8):
        assert fastpath.ffn_band_rows(ffn, x, 9, 10) == 0  # training: whole map
        assert fastpath.banded_ffn(ffn, x, 9, 10) is None
        with torch.no_grad():
            assert fastpath.ffn_band_rows(ffn, x, 9, 10) == 4
            assert fastpath.ffn_band_rows(ffn, x.to("meta"), 9, 10) == 0  # FLOP counting: whole map
            banded = ffn(x, 9, 10)
    with fastpath.options(ffn_band_tokens=None), torch.no_grad():
        assert fastpath.ffn_band_rows(ffn, x, 9, 10) == 0
        torch.testing.assert_close(banded, ffn(x, 9, 10), rtol=0, atol=1e-6)


def test_default_bands_only_large_maps():
    ffn = efa.ConvFFN(8, 16, relu=False)
    with torch.no_grad():
        assert fastpath.ffn_band_rows(ffn, torch.randn(1, 64 * 64, 8), 64, 64) == 0  # 4096 tokens: whole map
        assert fastpath.ffn_band_rows(ffn, torch.randn(1, 128 * 128, 8), 128, 128) == 32


# -- huge-page resize ------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_resize_bilinear_huge_page_path_is_bit_exact(channels_last, dtype):
    x = torch.randn(2, 19, 17, 23, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x, size=(130, 67), mode="bilinear", align_corners=False)
    with torch.inference_mode(), fastpath.options(huge_pages=True, huge_page_min_bytes=0):
        assert fastpath._huge_page_output(x, (130, 67)) == (fastpath._madvise_hugepage() is not None)
        got = fastpath.resize_bilinear(x, (130, 67))
    assert torch.equal(got, expected)
    assert got.stride() == expected.stride()


def test_huge_pages_off_by_default_and_above_the_threshold_only():
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert not fastpath._huge_page_output(x, (16, 16))
        with fastpath.options(huge_pages=True):  # 4 KiB output, below the 32 MiB default threshold
            assert not fastpath._huge_page_output(x, (16, 16))


def test_model_output_identical_with_and_without_huge_pages(model_t):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        with fastpath.options(huge_pages=True, huge_page_min_bytes=0):
            fast = model_t(x)
        plain = model_t(x)
    assert torch.equal(fast, plain)


def test_resize_bilinear_keeps_autograd():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with fastpath.options(huge_pages=True, huge_page_min_bytes=0):
        assert not fastpath._huge_page_output(x, (16, 16))
        fastpath.resize_bilinear(x, (16, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
