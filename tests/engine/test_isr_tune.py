"""The ISR auto-tuner: search space, the exact search against an exhaustive evaluation of the
grid, budgets (GFLOPs, injected latency, mIoU drop), the Pareto front, the stored setting and
the ``isr-tune`` command."""
import json

import pytest
import torch

import edaformer
from edaformer.checkpoint import read_checkpoint, save_checkpoint
from edaformer.cli import main
from edaformer.engine.isr_tune import (Budget, Candidate, apply_isr, calibration_subset, default_write_path,
                                       grid_settings, measure_gflops, measure_latency,
                                       pareto_front, parse_factors, score_setting, search, tune_isr,
                                       write_isr_checkpoint)
from edaformer.flops import count_flops
from edaformer.meta import stored_isr
from edaformer.inference import TestProtocol
from edaformer.isr import PAPER_ISR_SWEEP
from tests.helpers.training_data import make_dataset, write_config

NAME = "edaformer-t-ade20k"
SIZE = (64, 64)  # 2222-222 needs 61x61
EVAL = dict(protocol=TestProtocol(scale=(64, 64)), workers=0)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = edaformer.create_model(NAME, num_classes=4, embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1],
                                   depths=[1, 1, 1, 1], decoder_dim=16)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, a 2-image dataset and the exhaustive table of the default grid: every
    setting's GFLOPs and (real evaluate) mIoU."""
    from edaformer.data import build_dataset

    torch.set_num_threads(1)
    root = make_dataset(tmp_path_factory.mktemp("tune") / "data", n=2, size=64)
    dataset = build_dataset({"type": "folder", "root": str(root), "classes": 4, "img_suffix": ".png",
                             "scale": [64, 64]}, "val")
    model = _tiny_model()
    grid = grid_settings()
    gflops, skipped = measure_gflops(model, grid, SIZE)
    table = {s: (gflops[s], score_setting(model, dataset, s, EVAL)) for s in grid}
    return dict(model=model, dataset=dataset, grid=grid, table=table, skipped=skipped)


def _candidates(table):
    return [Candidate(s, g) for s, (g, _) in table.items()]


def _counting(table):
    calls = []

    def score(setting):
        calls.append(setting)
        return table[setting][1]
    return score, calls


# -- search space -----------------------------------------------------------------------------------
def test_grid_is_every_combination_or_the_paper_sweep():
    grid = grid_settings()
    assert len(grid) == 128 == len(set(grid)) and grid[0] == "1111-111" and "2121-212" in grid
    assert grid_settings(grid="paper") == list(PAPER_ISR_SWEEP)
    assert grid_settings([2]) == ["1111-111", "2222-222"]  # the reference is always there
    assert len(grid_settings([1, 2, 4])) == 3 ** 7
    with pytest.raises(ValueError, match="at most 2187"):
        grid_settings([1, 2, 3, 4])
    assert parse_factors("1, 2") == [1, 2]
    with pytest.raises(ValueError, match="--factors '1,x'"):
        parse_factors("1,x")
    with pytest.raises(ValueError, match="unknown ISR grid"):
        grid_settings(grid="wide")


def test_calibration_subset_spreads_evenly():
    data = list(range(10))
    assert list(calibration_subset(data, 4).indices) == [0, 2, 5, 7]
    assert calibration_subset(data, None) is data and calibration_subset(data, 50) is data
    with pytest.raises(ValueError, match="at least 1 image"):
        calibration_subset(data, 0)


# -- the search is exact --------------------------------------------------------------------------
def test_gflops_are_the_counter_numbers_of_edaformer_flops(tiny):
    model = _tiny_model()
    assert not tiny["skipped"]
    for setting in ("1111-111", "2211-222", "1212-121"):
        model.set_isr(setting)
        assert tiny["table"][setting][0] == count_flops(model, SIZE).gflops
    assert str(tiny["model"].isr) == "1111-111"  # counted and evaluated settings are not left behind


def test_budget_search_equals_exhaustive_evaluation(tiny):
    table = tiny["table"]
    assert len({m for _, m in table.values()}) > 10  # the tiny model really tells settings apart
    costs = sorted({g for g, _ in table.values()})
    for budget_gflops in (costs[0], costs[len(costs) // 4], costs[len(costs) // 2], costs[-1]):
        score, calls = _counting(table)
        chosen, reference = search(_candidates(table), Budget("gflops", budget_gflops), score)
        feasible = [(m, -g, s) for s, (g, m) in table.items() if g <= budget_gflops]
        best_m, best_neg_g, _ = max(feasible, key=lambda t: (t[0], t[1]))
        assert (chosen.mIoU, chosen.gflops) == (best_m, -best_neg_g)
        assert reference.mIoU == table["1111-111"][1]
        assert set(calls) == {s for s, (g, _) in table.items() if g <= budget_gflops} | {"1111-111"}
        assert len(calls) == len(set(calls))  # nothing evaluated twice


def test_max_drop_search_equals_exhaustive_evaluation_with_fewer_evaluations(tiny):
    table = tiny["table"]
    ref = table["1111-111"][1]
    drops = sorted(100 * (ref - m) for _, m in table.values() if m < ref)
    for drop in (0.0, drops[0], drops[len(drops) // 2], 100.0):
        score, calls = _counting(table)
        chosen, _ = search(_candidates(table), Budget("max_drop", drop), score)
        ok = [(g, -m) for g, m in table.values() if m >= ref - drop / 100 - 1e-12]
        fewest_g, neg_m = min(ok)
        assert (chosen.gflops, chosen.mIoU) == (fewest_g, -neg_m)
        assert all(g <= fewest_g for s in calls if s != "1111-111" for g in [table[s][0]])
        if drop == 100.0:
            assert len(calls) < 10  # the cheapest settings are within 100 points: a short search


def test_max_drop_search_on_a_model_that_loses_accuracy_when_reduced(tiny):
    """Trained models lose mIoU as GFLOPs fall (the random tiny one need not): the search walks
    up from the cheapest settings; still the exhaustive answer, with fewer evaluations."""
    g = torch.Generator().manual_seed(0)
    gflops = {s: gf for s, (gf, _) in tiny["table"].items()}
    top, spread = gflops["1111-111"], gflops["1111-111"] - min(gflops.values())
    table = {s: (gf, 0.5 - 0.2 * (top - gf) / spread + 0.005 * float(torch.rand((), generator=g)))
             for s, gf in gflops.items()}  # 1111-111 to the cheapest: -20 points, +-0.5 noise
    ref = table["1111-111"][1]
    counts = []
    for drop in (0.5, 2.0, 5.0, 10.0):
        score, calls = _counting(table)
        chosen, _ = search(_candidates(table), Budget("max_drop", drop), score)
        fewest_g, neg_m = min((gf, -m) for gf, m in table.values() if m >= ref - drop / 100 - 1e-12)
        assert (chosen.gflops, chosen.mIoU) == (fewest_g, -neg_m)
        counts.append(len(calls))
    assert counts == sorted(counts, reverse=True) and 2 < counts[-1] < counts[1] < len(table)  # looser: shorter


def test_tune_isr_end_to_end_with_the_real_evaluation(tiny):
    """The whole pipeline (counter, search, evaluate, timer) on the tiny model and grid."""
    table = tiny["table"]
    timed = []
    result = tune_isr(tiny["model"], tiny["dataset"], Budget("max_drop", 1.0), settings=tiny["grid"],
                      flops_input_size=SIZE, eval_kwargs=EVAL,
                      timer=lambda model, settings: timed.extend(settings) or {s: 1.0 for s in settings})
    ok = [(g, -m, s) for s, (g, m) in table.items() if m >= table["1111-111"][1] - 0.01 - 1e-12]
    assert result.chosen.isr == min(ok)[2] and result.chosen.mIoU == table[result.chosen.isr][1]
    assert all(c.mIoU == table[c.isr][1] for c in result.evaluated)
    assert set(timed) == {r["isr"] for r in result.table_rows()}  # only the table's rows are timed
    summary = result.summary()
    assert set(summary) == {"isr", "gflops", "ms", "mIoU"} and summary["ms"] == 1.0
    assert str(tiny["model"].isr) == "1111-111"


def test_budget_ms_uses_the_timer_for_every_setting():
    """Latency that disagrees with GFLOPs: the budget is decided by the (injected) ms."""
    gflops = {s: 1.0 + i for i, s in enumerate(PAPER_ISR_SWEEP[::-1])}  # 2222-222 cheapest in GFLOPs
    ms = {"1111-111": 10.0, "1111-222": 4.0, "2211-222": 6.0, "2222-222": 9.0}
    miou = {"1111-111": 0.50, "1111-222": 0.47, "2211-222": 0.49, "2222-222": 0.48}
    candidates = [Candidate(s, gflops[s], ms=ms[s]) for s in PAPER_ISR_SWEEP]
    chosen, _ = search(candidates, Budget("ms", 6.5), miou.__getitem__)
    assert chosen.isr == "2211-222"
    chosen, _ = search([Candidate(s, gflops[s], ms=ms[s]) for s in PAPER_ISR_SWEEP], Budget("ms", 5.0),
                       miou.__getitem__)
    assert chosen.isr == "1111-222"
    with pytest.raises(ValueError, match=r"no ISR setting of the grid meets the budget <= 3 ms: the cheapest, "
                                         r"1111-222, needs 4\.0 ms"):
        search([Candidate(s, gflops[s], ms=ms[s]) for s in PAPER_ISR_SWEEP], Budget("ms", 3.0), miou.__getitem__)

    calls = []

    def timer(model, settings):
        calls.append(list(settings))
        return {s: ms[s] for s in settings}

    result = tune_isr(_tiny_model(), None, Budget("ms", 6.5), settings=PAPER_ISR_SWEEP, flops_input_size=SIZE,
                      timer=timer, score=miou.__getitem__)
    assert calls == [list(PAPER_ISR_SWEEP)] and result.chosen.isr == "2211-222" and result.chosen.ms == 6.0
    assert [c.isr for c in result.front] == ["1111-222", "2211-222", "1111-111"]  # on the ms axis


def test_measure_latency_times_each_setting_and_restores_it():
    model = _tiny_model().set_isr("2211-222")
    times = measure_latency(model, ["1111-111", "2222-222"], SIZE, runs=1, warmup=0)
    assert set(times) == {"1111-111", "2222-222"} and all(t > 0 for t in times.values())
    assert str(model.isr) == "2211-222"


def test_pareto_front_and_tie_breaks():
    cands = [Candidate("a", 3.0, mIoU=0.5), Candidate("b", 2.0, mIoU=0.5), Candidate("c", 1.0, mIoU=0.3),
             Candidate("d", 2.0, mIoU=0.4), Candidate("e", 0.5, mIoU=None)]
    assert [c.isr for c in pareto_front(cands)] == ["c", "b"]
    table = {"1111-111": (3.0, 0.5), "2211-222": (2.0, 0.5), "2222-222": (1.0, 0.3)}
    chosen, _ = search(_candidates(table), Budget("gflops", 5.0), lambda s: table[s][1])
    assert chosen.isr == "2211-222"  # equal mIoU: fewer GFLOPs
    with pytest.raises(ValueError, match="positive number"):
        Budget("gflops", 0)
    with pytest.raises(ValueError, match="unknown budget"):
        Budget("params", 1)


def test_pool_is_passed_only_when_given():
    class Stub:
        def __init__(self):
            self.calls = []

        def set_isr(self, spec, pool="avg"):
            self.calls.append((spec, pool))

    stub = Stub()
    apply_isr(stub, "2211-222")
    apply_isr(stub, "2211-222", pool="max")
    stub.isr_pool = "overlap"  # a model's own pool kind is kept
    apply_isr(stub, "1111-111")
    assert stub.calls == [("2211-222", "avg"), ("2211-222", "max"), ("1111-111", "overlap")]
    with pytest.raises(ValueError, match="--pool max: .*takes no pool option"):
        apply_isr(type("Plain", (), {"set_isr": lambda self, spec: None})(), "2211-222", pool="max")


# -- the stored setting ----------------------------------------------------------------------------
def test_stored_isr():
    assert stored_isr(None) is None and stored_isr({}) is None and stored_isr({"isr": None}) is None
    assert stored_isr({"isr": "2211-222"}) == "2211-222"
    assert stored_isr({"isr": "2,2,1,1-2,2,2"}) == "2211-222"
    with pytest.raises(ValueError, match=r"checkpoint ck\.pth: meta\.isr is not an ISR setting"):
        stored_isr({"isr": "fast"}, source="ck.pth")


def test_write_isr_checkpoint_makes_a_copy(tmp_path):
    from edaformer.checkpoint import load_checkpoint

    model = _tiny_model()
    original = tmp_path / "best.pth"
    save_checkpoint({"format": "edaformer", "state_dict": model.state_dict(), "meta": {"iteration": 7}}, original)
    before = original.read_bytes()
    result = tune_isr(model, None, Budget("gflops", 1.0), settings=PAPER_ISR_SWEEP, flops_input_size=SIZE,
                      timer=lambda m, ss: {s: 2.0 for s in ss}, score={"1111-111": 0.4, "1111-222": 0.41,
                                                                       "2211-222": 0.3, "2222-222": 0.2}.get)
    path = write_isr_checkpoint(original, result)
    assert path == default_write_path(original, "1111-222") == tmp_path / "best-isr1111-222.pth"
    assert original.read_bytes() == before
    meta = read_checkpoint(path)["meta"]
    assert stored_isr(meta, source=path) == "1111-222" and meta["iteration"] == 7
    assert meta["isr_tune"]["mIoU"] == 0.41
    report = load_checkpoint(_tiny_model(seed=3), path)
    assert report["meta"]["isr"] == "1111-222"
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        write_isr_checkpoint(original, result, original)
    save_checkpoint(model.state_dict(), tmp_path / "bare.pth")  # a bare state dict gets wrapped
    assert read_checkpoint(write_isr_checkpoint(tmp_path / "bare.pth", result, pool="max"))["meta"]["isr_pool"] == "max"


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = make_dataset(tmp / "data", n=3, size=64)
    cfg = write_config(tmp / "tune.yaml", data, size=64, data={"workers": 0}, eval={"flops_input_size": [64, 96]})
    torch.manual_seed(0)
    save_checkpoint(edaformer.create_model(NAME, num_classes=4), tmp / "ck.pth")
    return tmp, cfg


def test_isr_tune_command(trained, capsys):
    tmp, cfg = trained
    code = main(["isr-tune", str(cfg), "--checkpoint", str(tmp / "ck.pth"), "--grid", "paper", "--max-drop", "100",
                 "--calib", "2", "--runs", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp / "out"),
                 "--write", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 of 3 images, 4 ISR settings" in out and "| ISR | GFLOPs @ 64x96 | ms | mIoU | change |" in out
    chosen = json.loads(out.strip().splitlines()[-1])
    assert set(chosen) == {"isr", "gflops", "ms", "mIoU"} and chosen["ms"] > 0
    assert chosen["isr"] == "2222-222"  # the cheapest of the grid is within 100 points
    assert main(["flops", NAME, "--size", "64", "96", "--isr", chosen["isr"], "--num-classes", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gflops"] == chosen["gflops"]
    saved = json.loads((tmp / "out" / "isr_tune.json").read_text())
    assert saved["chosen"] == chosen and saved["meta"]["images"] == 2
    assert read_checkpoint(tmp / "ck-isr2222-222.pth")["meta"]["isr"] == "2222-222"
    if (tmp / "out" / "isr_tune.png").exists():
        from PIL import Image

        assert Image.open(tmp / "out" / "isr_tune.png").format == "PNG"
    else:
        assert pytest.importorskip("matplotlib") is None  # absent only without matplotlib


def test_isr_tune_command_errors(trained, capsys):
    tmp, cfg = trained
    base = ["isr-tune", str(cfg), "--checkpoint", str(tmp / "ck.pth"), "--grid", "paper", "--device", "cpu",
            "--out", str(tmp / "out2")]
    assert main([*base, "--budget-gflops", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "edaformer isr-tune: error: no ISR setting of the grid meets the budget <= 0.0001 GFLOPs" in err
    with pytest.raises(SystemExit):
        main([*base, "--budget-gflops", "1", "--max-drop", "1"])  # one budget only
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*base, "--max-drop", "-1"]) == 2
    assert "must be a number >= 0" in capsys.readouterr().err
    import inspect

    from edaformer.engine.evaluate import evaluate
    from edaformer.models.segmentor import EDAFormer

    if "pool" not in inspect.signature(EDAFormer.set_isr).parameters:
        assert main([*base, "--max-drop", "1", "--pool", "max"]) == 2
        assert "--pool max: EDAFormer.set_isr takes no pool option" in capsys.readouterr().err
    elif "pool" not in inspect.signature(evaluate).parameters:  # mIoU would be measured with avg pooling
        assert main([*base, "--max-drop", "1", "--pool", "max"]) == 2
        assert "ISR pool 'max': the evaluation of this version scores average pooling only" in capsys.readouterr().err


def test_plot_pareto_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the Pareto plot needs matplotlib")
    from PIL import Image

    from edaformer.plotting import plot_pareto

    points = [dict(isr="1111-111", gflops=5.6, mIoU=0.42), dict(isr="2211-222", gflops=4.7, mIoU=0.41),
              dict(isr="2222-222", gflops=4.5, mIoU=0.38), dict(isr="1212-121", gflops=5.0, mIoU=0.37)]
    png = plot_pareto(points, points[:3][::-1], tmp_path / "p.png", chosen="2211-222", budget=4.8)
    assert Image.open(png).format == "PNG" and Image.open(png).size[0] > 300
