"""bench/quality_report.py's seed statistics: a cell is the mean over seeds with its standard
error, a column's average needs every task, a gap to full fine-tuning is paired by seed, and a run
saved before results carried their seed takes it from the run's arguments."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
from support import bench_module


@pytest.fixture(scope="module")
def qr():
    return bench_module("quality_report")


def result(qr, task: str, method: str, score: float, seed: int, target: float = 0.01):
    return qr.Result(task, method, 1.0 if method == "full" else target, target, score, score, 1000, None,
                     1.0, None, seed, 10)


def test_stat_is_mean_and_standard_error(qr) -> None:
    s = qr.stat([80.0, 84.0])
    assert (s.mean, s.n) == (82.0, 2)
    assert s.se == pytest.approx(2.0)  # sd 2.83 / sqrt 2
    one = qr.stat([70.0])
    assert one.se is None and str(one) == "70.00 (1 seed)"
    assert qr.stat([1.0, 2.0, 3.0]).format() == f"+2.00 ± {math.sqrt(1 / 3):.2f}"


def test_average_needs_every_task_and_propagates_errors(qr) -> None:
    rs = [result(qr, "a", "full", 80, 0), result(qr, "a", "full", 84, 1),
          result(qr, "b", "full", 60, 0), result(qr, "b", "full", 62, 1),
          result(qr, "a", "lora", 70, 0)]
    avg = qr.averages(rs, ["a", "b"])
    assert avg["full"].mean == pytest.approx(71.5)
    assert avg["full"].se == pytest.approx(math.sqrt(2.0 ** 2 + 1.0 ** 2) / 2)
    assert "lora 1.0%" not in avg  # task b has no LoRA score


def test_gap_is_paired_by_seed(qr) -> None:
    # seed 1's split is harder for both methods: the paired gap has no spread, the unpaired one has
    rs = [result(qr, "a", "full", 90, 0), result(qr, "a", "full", 80, 1),
          result(qr, "a", "dense-extract", 89, 0), result(qr, "a", "dense-extract", 79, 1),
          result(qr, "a", "dense-extract-block", 85, 0)]
    g = qr.gap(rs, ["a"], "dense-extract 1.0%")
    assert (g.mean, g.se) == (pytest.approx(-1.0), pytest.approx(0.0))
    one = qr.gap(rs, ["a"], "dense-extract-block 1.0%")
    assert one.mean == pytest.approx(-5.0) and one.se is None  # only seed 0 has both
    assert qr.gap(rs, ["a", "b"], "dense-extract 1.0%") is None  # task b measured nothing
    assert "**within 1 point**" in qr.verdict(rs, ["a"])


def test_results_saved_without_seed_take_the_runs(qr, tmp_path: Path) -> None:
    r = asdict(result(qr, "a", "full", 80, 0))
    del r["seed"], r["steps"]
    (tmp_path / "quality.json").write_text(json.dumps(
        {"args": {"seed": 3, "steps": 250}, "minutes": 1.0, "results": [r]}))
    (loaded,), args, _, _ = qr.load_results(tmp_path / "quality.json")
    assert (loaded.seed, loaded.steps) == (3, 250)


def test_lora_lr_names_the_tasks_that_ran_at_another(qr) -> None:
    import argparse

    one = argparse.Namespace(lora_lr=2e-3, lora_lrs={"sst2": 2e-3, "qnli": 2e-3})
    assert qr.lora_lr(one) == "0.002"
    mixed = argparse.Namespace(lora_lr=2e-3, lora_lrs={"sst2": 2e-3, "qnli": 2e-3, "stsb": 5e-4})
    assert qr.lora_lr(mixed) == "0.002 (stsb: 0.0005)"


def test_a_task_where_full_fine_tuning_is_not_clearly_past_chance_is_set_apart(qr) -> None:
    rs = [result(qr, "a", "full", 9.5, 0), result(qr, "a", "full", 0.0, 1),  # 4.75 ± 4.75 over 0
          result(qr, "b", "full", 80.0, 0), result(qr, "b", "full", 84.0, 1),
          result(qr, "c", "full", 50.5, 0), result(qr, "c", "full", 50.3, 1),
          result(qr, "d", "full", 70.0, 0)]  # one seed: no error to judge it by
    assert qr.uninformative(rs, {"a": 0.0, "b": 50.0, "c": 50.0, "d": 50.0}) == ["a", "c", "d"]


def test_merge_compares_only_the_settings_both_runs_read(qr, tmp_path: Path, monkeypatch) -> None:
    # a rerun of the sparse columns at another --de-lr merges with the full / LoRA run it did not change
    q = bench_module("quality")
    template = json.loads((Path(__file__).parents[2] / "docs" / "quality.json").read_text())["args"]

    def run(name: str, methods: list[str], rows: list, **settings) -> Path:
        (tmp_path / name).mkdir()
        args = {**template, "tasks": "sst2", "methods": methods, "lora_lrs": {}, **settings}
        (tmp_path / name / "quality.json").write_text(json.dumps(
            {"args": args, "minutes": 1.0, "results": [asdict(r) for r in rows]}))
        return tmp_path / name

    dense = run("full", ["full", "lora"],
                [result(qr, "sst2", "full", 88, 0), result(qr, "sst2", "lora", 86, 0)], de_lr=1e-3,
                lora_lrs={"sst2": 5e-4})
    sparse = run("sparse", ["dense-extract"], [result(qr, "sst2", "dense-extract", 87, 0)], de_lr=3e-3)
    written = {}  # what the report would be rendered from (rendering reads the task files)
    monkeypatch.setattr(q, "write_report",
                        lambda out, results, args, *_: written.update(results=results, args=args))
    q.merge([dense, sparse], tmp_path / "out")
    assert written["args"].de_lr == 3e-3  # from the run that trained dense-extract
    assert len(written["results"]) == 3
    assert written["args"].lora_lrs == {"sst2": 5e-4}  # a merged run's own per-task rates, kept
    other = run("other", ["dense-extract"], [result(qr, "sst2", "dense-extract", 85, 1)], de_lr=1e-3)
    with pytest.raises(SystemExit, match="de_lr"):  # two dense-extract runs at different rates
        q.merge([dense, sparse, other], tmp_path / "out2")
    shorter = run("shorter", ["full"], [result(qr, "sst2", "full", 80, 1)], max_length=64)
    with pytest.raises(SystemExit, match="max_length"):  # a setting every method reads
        q.merge([dense, sparse, shorter], tmp_path / "out3")
