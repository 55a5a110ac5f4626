"""The ablation summary from hand-made runs: arms, convergence, the generated conclusion, missing metrics, the
training-set-size subset. No MLflow: :class:`~medsup.tracking.experiments.RunRecord` is plain data."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from medsup.config import load
from medsup.data.splits import fold_split, limit_training
from medsup.evaluation.ablation import (
    DATASET_PARAM,
    RECORD_TAG,
    ExitResult,
    conclude,
    exit_result,
    exit_sources,
    load_summary,
    metric_class,
    read_early_exit,
    summarize,
)
from medsup.evaluation.ablation_overview import (
    find_reports,
    mean_ranks,
    paired_gaps,
    paper_claims,
    verdict,
    write_overview,
)
from medsup.evaluation.ablation_records import read_record, read_records, record_path, write_record
from medsup.evaluation.ablation_report import render, write_report
from medsup.tracking.experiments import RunRecord


def _run(scheme: str, seed: int, n: int, dice: list[float], grad: bool = True, status: str = "FINISHED",
         start: int = 0, task: str = "liver", metric: str = "val.dice.liver") -> RunRecord:
    history = {metric: list(enumerate(dice, start=1))}
    if grad:
        history["train.grad_norm.encoder0"] = [(e, 1.0 / e) for e in range(1, len(dice) + 1)]
    return RunRecord(f"id-{scheme}-{seed}-{n}-{start}", f"{scheme}-s{seed}-n{n}", status, start,
                     {"task": task, "loss.scheme": scheme, "seed": str(seed), "train.epochs": str(len(dice)),
                      "train.iterations_per_epoch": "20", "planned.batch_size": "2"},
                     {"n_train": str(n)}, {}, history)


def _runs() -> list[RunRecord]:
    runs = []
    for seed in (0, 1):
        jitter = 0.01 * seed
        runs += [_run("none", seed, 20, [0.5, 0.8, 0.88 + jitter]), _run("none", seed, 2, [0.3, 0.5, 0.6]),
                 _run("nnunet", seed, 20, [0.7, 0.91, 0.95 - jitter]), _run("nnunet", seed, 2, [0.4, 0.7, 0.75]),
                 _run("dsn", seed, 20, [0.6, 0.85, 0.93], grad=False), _run("dsn", seed, 2, [0.4, 0.6, 0.7])]
    return runs


def test_summary_numbers_and_generated_conclusion() -> None:
    stale = _run("none", 0, 20, [0.99, 0.99, 0.99], start=-1)  # an older run of the same arm: replaced
    failed = _run("dsn", 5, 20, [0.1], status="FAILED", start=9)
    other_task = _run("none", 0, 20, [0.1], task="lung")
    s = summarize([stale, *_runs(), failed, other_task], "medsup-ablation", "liver", current_default="nnunet")
    assert (s.metric, s.threshold) == ("val.dice.liver", 0.9)
    assert len(s.arms) == 12 and s.schemes == ["none", "nnunet", "dsn"] and s.sizes == [2, 20]
    assert [x for x in s.skipped if "FAILED" in x] and len(s.skipped) == 1
    nnunet = s.select("nnunet", 20)
    assert [a.epochs_to_threshold for a in nnunet] == [2, 2]
    assert all(a.epochs_to_threshold is None for a in s.select("none", 20))
    assert s.default_scheme == "nnunet"
    text = " ".join(s.conclusion)
    assert "`nnunet` has the highest best validation val.dice.liver (0.945" in text
    assert "leads `dsn` by +0.015" in text and "leads `none` by +0.060" in text
    assert "With n_train = 2, `nnunet` is best (0.750), +0.050 ahead of `dsn`" in text
    assert "`nnunet` reaches val.dice.liver >= 0.9 first, after 2.0 epochs" in text
    assert "agrees with this" in text
    report = render(s, "ablation.png", ["bash pipelines/ablation.sh"])
    assert "| `nnunet` | – (0/2) | 2.0 ± 0.0 (2/2) |" in report
    assert "| `dsn` | not logged | not logged | not logged | – |" in report  # missing grad norms: said, not fatal
    assert "| `none` | 1.0000 ± 0.0000 | 0.3333 ± 0.0000 | 0.6111 ± 0.0000 | 0.33 ± 0.00 |" in report
    assert "| `none` | 0.600 ± 0.000 / 0.600 ± 0.000 | 0.885 ± 0.007 / 0.885 ± 0.007 |" in report
    assert "the same for every arm" in report


def test_the_conclusion_follows_the_numbers() -> None:
    runs = [_run("none", seed, 20, [0.5, 0.97]) for seed in (0, 1)] + [_run("nnunet", seed, 20, [0.5, 0.9])
                                                                        for seed in (0, 1)]
    s = summarize(runs, "e", "liver", current_default="nnunet")
    assert s.default_scheme == "none"
    assert "differs: these numbers favour `none`" in " ".join(s.conclusion)


def test_no_arms_is_an_error() -> None:
    with pytest.raises(ValueError, match="no finished liver runs"):
        summarize([_run("none", 0, 2, [0.5], task="lung")], "e", "liver")


def _early_exits(tmp_path: Path) -> Path:
    """Two early exits (levels 0 and 1) of the arm nnunet / seed 1 / n_train 20, as pipelines/ablation.sh
    leaves them: report.json, evaluation/summary.json, the model bundle's config.json; returns their root."""
    bundle = tmp_path / "runs" / "arm" / "model"
    bundle.mkdir(parents=True)
    cfg = load("liver", ["loss.scheme=nnunet", "seed=1", "data.max_train_cases=20"])
    (bundle / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    for level, seconds, dice in ((0, 2.0, 0.9), (1, 0.5, 0.8)):
        folder = tmp_path / "early" / "arm" / f"exit{level}"
        (folder / "evaluation").mkdir(parents=True)
        case = {"status": "ok", "seconds": {"network": seconds / 2}, "seconds_total": seconds}
        (folder / "report.json").write_text(json.dumps({"model": str(bundle.parent), "settings": {"exit_level": level},
                                                        "cases": [case]}), encoding="utf-8")
        lesions = {"recall": 0.75 - 0.25 * level, "precision": 0.5}
        (folder / "evaluation" / "summary.json").write_text(json.dumps(
            {"classes": {"liver": {"dice": {"mean": dice}},
                         "tumour": {"dice": {"mean": 0.1, "global": 0.3}, "lesions": lesions}}}), encoding="utf-8")
    return tmp_path / "early"


def test_write_report_and_early_exit(tmp_path: Path) -> None:
    _early_exits(tmp_path)
    exits = read_early_exit(tmp_path / "early", "val.dice.liver")
    assert [(e.scheme, e.seed, e.n_train, e.level, e.dice, e.total_s) for e in exits] == [
        ("nnunet", 1, 20, 0, 0.9, 2.0), ("nnunet", 1, 20, 1, 0.8, 0.5)]
    # a global validation metric reads the evaluation's global Dice of the same class
    assert [e.dice for e in read_early_exit(tmp_path / "early", "val.dice_global.tumour")] == [0.3, 0.3]
    assert [e.dice for e in read_early_exit(tmp_path / "early", "val.dice.tumour")] == [0.1, 0.1]
    s = summarize(_runs(), "medsup-ablation", "liver", early_exit_dir=tmp_path / "early")
    paths = write_report(s, tmp_path / "docs", ["bash pipelines/ablation.sh"])
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "| `nnunet` | 20 | 1 | 0.800 | 0.250 | 0.500 | 4.00x | 0.500 | 0.500 |" in text
    assert "| tumour lesion recall | tumour lesion precision |" in text
    assert exits[0].lesion_recall == {"tumour": 0.75}
    assert "find few" not in text  # 0.75 of the tumours found at level 0
    for e in s.early_exit:  # the same models, had they missed nearly every tumour
        e.lesion_recall = {"tumour": 0.1}
    caveat = " ".join(conclude(s, "nnunet")[1])
    assert "find few tumour lesions (lesion recall at most 0.10" in caveat and "about liver, not tumour" in caveat
    assert "higher Dice than its full-resolution head" not in caveat  # level 1: 0.8 < 0.9
    s.early_exit[1].dice = 0.95  # the coarse head now beats the full-resolution one: said, with the numbers
    said = " ".join(conclude(s, "nnunet")[1])
    assert "`nnunet`'s exit level 1 scores a higher Dice than its full-resolution head (0.950 vs 0.900, " \
           "n_train = 20)." in said
    # an ablation.json written before lesion-wise detection existed still loads
    numbers = json.loads(paths["numbers"].read_text(encoding="utf-8"))
    for e in numbers["early_exit"]:
        del e["lesion_recall"], e["lesion_precision"]
    (tmp_path / "old.json").write_text(json.dumps(numbers), encoding="utf-8")
    assert load_summary(tmp_path / "old.json").early_exit[1].lesion_recall == {}
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["numbers"].read_text(encoding="utf-8"))["default_scheme"] == "nnunet"
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["ablation.json", "ablation.md", "ablation.png"]


def test_arm_records_round_trip_and_stand_in_for_the_store(tmp_path: Path) -> None:
    early = _early_exits(tmp_path)
    runs = _runs()
    arm = _run("nnunet", 1, 20, [0.7, float("nan"), 0.94])
    arm.params["data.max_train_cases"] = "20"
    arm.history["val.loss"] = [(1, 0.5)]
    arm.history["train.loss"] = [(1, 0.7)]  # not a summary curve: not recorded
    path = write_record(tmp_path / "arms", arm, exit_sources(early), "medsup-ablation", "sqlite:///x.db")
    assert path == tmp_path / "arms" / f"{arm.name}.json"
    back, exits = read_record(path)
    assert back.tags[RECORD_TAG] == str(path) and back.params == arm.params
    assert back.history == {"val.dice.liver": [(1, 0.7), (3, 0.94)],  # NaN (null in JSON) dropped, as summarize does
                            "train.grad_norm.encoder0": arm.history["train.grad_norm.encoder0"], "val.loss": [(1, 0.5)]}
    assert [exit_result(e, "val.dice.liver") for e in exits] == read_early_exit(early, "val.dice.liver")

    # the store lost this arm's run (a fresh checkout): its record stands in, early exits included
    shutil.rmtree(early)
    recorded, recorded_exits = read_records(tmp_path / "arms")
    others = [r for r in runs if r.name != arm.name]
    s = summarize([*others, *recorded], "medsup-ablation", "liver", early_exit_dir=None, recorded_exits=recorded_exits)
    from_record = s.select("nnunet", 20)
    assert [(a.seed, a.best, a.record) for a in from_record] == [(0, 0.95, ""), (1, 0.94, str(path))]
    assert [(e.level, e.dice, e.total_s) for e in s.early_exit] == [(0, 0.9, 2.0), (1, 0.8, 0.5)]
    assert "(1 of them trained in an earlier checkout and read back from their arm records" in render(s, "f", [])
    assert read_records(tmp_path / "none") == ([], [])  # no folder, no records

    # only finished arms are recorded, with their own early exits; a bad record names its file
    with pytest.raises(ValueError, match="is FAILED, not FINISHED"):
        write_record(tmp_path / "arms", _run("none", 0, 2, [0.1], status="FAILED"), [], "e", "u")
    other_arm = _run("dsn", 1, 20, [0.5])
    other_arm.params["data.max_train_cases"] = "20"
    with pytest.raises(ValueError, match=r"an early exit of arm .*'nnunet'.* not of run dsn-s1-n20"):
        write_record(tmp_path / "arms", other_arm, exits, "e", "u")
    with pytest.raises(ValueError, match="cannot name an arm record"):
        record_path(tmp_path, "../x")
    # arms of another pool (other synthesis code or settings) are refused beside these, and flagged in a report
    arm.params[DATASET_PARAM] = "aaaa"
    write_record(tmp_path / "arms", arm, [], "e", "u")  # the same arm again: replaces its own record
    stranger = _run("none", 2, 20, [0.5])
    stranger.params[DATASET_PARAM] = "bbbb"
    with pytest.raises(ValueError, match=rf"trained on dataset bbbb .* but .*{arm.name}.json on aaaa"):
        write_record(tmp_path / "arms", stranger, [], "e", "u")
    mixed = summarize([*read_records(tmp_path / "arms")[0], stranger], "e", "liver")
    assert "**The arms were trained on 2 different datasets** (fingerprints aaaa, bbbb)" in render(mixed, "f", [])
    (tmp_path / "arms" / "broken.json").write_text('{"format": "something else"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json: not an ablation arm record \(format 'something else'"):
        read_records(tmp_path / "arms")


def test_training_subsets_are_nested_and_keep_the_validation_set() -> None:
    ids = [f"case{i:02d}" for i in range(25)]
    subsets = {}
    for n in (2, 5, 20, 50):
        cfg = load("liver", ["data.split_seed=0", "seed=3", f"data.max_train_cases={n}"])
        splits, fold, split = fold_split(ids, cfg)
        assert fold == 0 and len(splits) == 5 and split["val"] == splits[0]["val"]
        subsets[n] = set(split["train"])
        assert subsets[n] <= set(splits[0]["train"])
    assert subsets[2] < subsets[5] < subsets[20] == subsets[50]
    # the global seed does not move the split when data.split_seed is set
    other = fold_split(ids, load("liver", ["data.split_seed=0", "seed=4", "data.max_train_cases=5"]))[2]
    assert set(other["train"]) == subsets[5]
    assert limit_training({"train": ["b", "a"], "val": ["c"]}, None, 0) == {"train": ["a", "b"], "val": ["c"]}


def test_cli_data_split_prints_the_split_training_uses(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsup.cli import app
    from tests.conftest import write_msd

    data = write_msd(tmp_path / "ds", n=6)
    runner = CliRunner()
    args = ["data", "split", str(data), "--task", "tiny", "--set", "data.num_folds=3", "--fold", "1"]
    shown = runner.invoke(app, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.stdout)
    expected = fold_split([f"case{i}" for i in range(6)], load("tiny", ["data.num_folds=3", "data.fold=1"]))[2]
    assert result["fold"] == 1 and [c["case"] for c in result["val"]] == expected["val"]
    images = runner.invoke(app, args).stdout.split()
    labels = runner.invoke(app, [*args, "--labels"]).stdout.split()
    assert images == [str((data / "imagesTr" / f"{c}.nii.gz").resolve()) for c in expected["val"]]
    assert labels == [str((data / "labelsTr" / f"{c}.nii.gz").resolve()) for c in expected["val"]]
    train = runner.invoke(app, [*args, "--subset", "train", "--set", "data.max_train_cases=2"]).stdout.split()
    assert len(train) == 2
    bad = runner.invoke(app, [*args, "--subset", "test"])
    assert bad.exit_code == 2
    missing = runner.invoke(app, ["data", "split", str(tmp_path / "nope"), "--task", "tiny"])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def _lung_runs() -> list[RunRecord]:
    """dsn ahead of nnunet on lung in both seeds; none last."""
    runs = []
    for seed in (0, 1):
        for scheme, top in (("none", 0.3), ("nnunet", 0.45), ("dsn", 0.55 + 0.01 * seed)):
            runs += [_run(scheme, seed, n, [top / 2, top - (0.1 if n == 2 else 0.0)], task="lung",
                          metric="val.dice_global.tumour") for n in (2, 20)]
    return runs


def test_overview_ranks_pairs_and_verdict() -> None:
    liver = summarize(_runs(), "medsup-ablation", "liver")
    lung = summarize(_lung_runs(), "medsup-ablation", "lung")
    # liver: nnunet > dsn > none at n = 20 and n = 2; lung: dsn > nnunet > none at both sizes
    assert mean_ranks([liver, lung]) == {"none": 3.0, "nnunet": 1.5, "dsn": 1.5}
    gaps = paired_gaps([liver, lung], "dsn", "nnunet")
    assert len(gaps) == 8 and sum(g > 0 for g in gaps) == 4
    winner, lines = verdict([liver, lung], current_default="nnunet")
    text = " ".join(lines)
    assert winner == "dsn"  # tied mean rank, larger paired gaps
    assert "`dsn` 1.50, `nnunet` 1.50, `none` 3.00" in text
    assert "Against `nnunet`, it is better in 4 of 8 paired arms" in text and "not consistent" in text
    assert "Against `none`, it is better in 8 of 8 paired arms" in text
    assert "liver: epochs to val.dice.liver >= 0.9 at n_train = 20: `dsn` 3.0 ± 0.0 (2/2)" in text
    assert "lung: epochs to val.dice_global.tumour >= 0.5 at n_train = 20: `dsn` 2.0 ± 0.0 (2/2)" in text
    assert "not consistently enough" in text
    # the lead that matters is over the configured default: dsn beats `none` in every pair
    assert "differs: these numbers favour `dsn`" in " ".join(verdict([liver, lung], current_default="none")[1])
    # only lung: dsn wins every pair, a real lead
    winner, lines = verdict([lung], current_default="nnunet")
    assert winner == "dsn" and "differs: these numbers favour `dsn`" in " ".join(lines)


def test_paper_claims_against_none() -> None:
    liver = summarize(_runs(), "medsup-ablation", "liver")
    # dsn seed 0: exit 1 twice as fast, Dice -0.05; exit 2 on seed 0 only; none seed 0: its coarse head untrained
    liver.early_exit = [ExitResult("dsn", 0, 20, 0, 0.90, 1.5, 2.0, 3, "a"),
                        ExitResult("dsn", 0, 20, 1, 0.85, 0.5, 1.0, 3, "b"),
                        ExitResult("dsn", 1, 20, 0, 0.80, 1.5, 2.0, 3, "c"),
                        ExitResult("dsn", 1, 20, 1, 0.80, 0.5, 1.0, 3, "d"),
                        ExitResult("none", 0, 20, 0, 0.90, 1.5, 2.0, 3, "e"),
                        ExitResult("dsn", 0, 2, 0, 0.10, 1.5, 9.0, 3, "f")]  # another model: not paired with n = 20
    caveat, convergence, low_data, gradients, exits = paper_claims([liver])
    # every curve rises to its last point: the caveat says the comparison is of progress within the budget
    assert caveat.startswith("- liver: 12 of 12 arms scored their best val.dice.liver at their last validation, "
                             "higher than the one before: still improving")
    # none never reaches 0.9; nnunet and dsn reach it in their two n = 20 arms, so no pair to count epochs on
    assert "`nnunet` in 2/4 arms (`none` 0): agrees; `dsn` in 2/4 arms (`none` 0): agrees" in convergence
    # best gains over none: nnunet +0.15 at n = 2 (both seeds), +0.07 / +0.05 at n = 20; dsn +0.10, +0.05 / +0.04
    assert "`nnunet` +0.150 / +0.060: agrees; `dsn` +0.100 / +0.045: agrees" in low_data
    # nnunet logs the same gradient curve as none (not larger); dsn logs none at all
    assert "`nnunet` x1.00 (larger in 0 of 2 seeds): against the paper; `dsn` not logged: untested" in gradients
    assert "`none` no coarser exit run; `dsn` level 1 2.00x, Dice -0.025" in exits
    # the other way round: none wins every pair, and reaches the threshold where the others do not
    flipped = [r for r in _runs() if r.params["loss.scheme"] != "none"] + [
        _run("none", seed, n, [0.91, 0.99, 0.99]) for seed in (0, 1) for n in (2, 20)]
    caveat, convergence, low_data, gradients = paper_claims([summarize(flipped, "medsup-ablation", "liver")])
    assert "8 of 12 arms" in caveat  # none's curves end flat at 0.99
    assert "`nnunet` in 2/4 arms (`none` 4), +1.0 epochs where both reached it (2 pairs): against the paper" \
        in convergence
    assert "`dsn` -0.290 / -0.060: against the paper" in low_data
    # only a baseline, or no baseline: nothing to claim
    only_dsn = summarize([r for r in _runs() if r.params["loss.scheme"] == "dsn"], "medsup-ablation", "liver")
    assert paper_claims([only_dsn]) == ["- No `none` arm next to a deep-supervised one: the claims need both."]
    # lung: neither none nor nnunet ever reaches 0.5 (untested), dsn does at n = 20; one bullet holds both tasks
    lung = summarize(_lung_runs(), "medsup-ablation", "lung")
    assert ". lung: `nnunet` in 0/4 arms (`none` 0): untested; `dsn` in 2/4 arms (`none` 0): agrees." \
        in paper_claims([liver, lung])[2]


def test_write_overview_from_the_reports(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "ablation"
    for task, runs in (("liver", _runs()), ("lung", _lung_runs())):
        summary = summarize(runs, "medsup-ablation", task)
        if task == "lung":  # one early exit, evaluated with lesion-wise detection
            summary.early_exit = [ExitResult("dsn", 0, 20, 0, 0.5, 1.0, 2.0, 3, "x", {"tumour": 0.75}, {"tumour": 1.0})]
        write_report(summary, docs / task, ["bash pipelines/ablation.sh"])
    again = load_summary(docs / "liver" / "ablation.json")  # the JSON round trip keeps the numbers
    original = summarize(_runs(), "medsup-ablation", "liver")
    assert [(a.scheme, a.seed, a.n_train, a.best, a.curve, a.grad) for a in again.arms] == [
        (a.scheme, a.seed, a.n_train, a.best, a.curve, a.grad) for a in original.arms]
    reports = find_reports([docs])
    assert reports == [docs / "liver", docs / "lung"]
    assert find_reports([docs / "lung" / "ablation.json", docs]) == [docs / "lung", docs / "liver"]
    out = tmp_path / "docs" / "ablation.md"
    paths = write_overview(reports, out, ["medsup ablation overview docs/ablation"], current_default="dsn")
    text = out.read_text(encoding="utf-8")
    assert "[liver](ablation/liver/ablation.md)" in text and "[lung](ablation/lung/ablation.md)" in text
    assert "| scheme | liver, n = 2 | liver, n = 20 | lung, n = 2 | lung, n = 20 |" in text
    assert "| `dsn` | 0.700 ± 0.000 | 0.930 ± 0.000 | 0.455 ± 0.007 | 0.555 ± 0.007 |" in text
    assert "(x1.00)" in text and "agrees with this" in text
    assert "| scheme | exit level | liver Dice | liver s/case | lung Dice | lung s/case | lung tumour lesion recall |" \
        in text
    assert "| `dsn` | 0 | – | – | 0.500 | 2.00 | 0.750 |" in text
    assert "![ablation overview](ablation.png)" in text
    assert "## The seed paper's claims, measured" in text and "- **Faster convergence**" in text
    assert "- **Every head a usable segmenter** (early exit" in text and "lung: `dsn` no coarser exit run." in text
    assert paths["figure"] == tmp_path / "docs" / "ablation.png"
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["numbers"].read_text(encoding="utf-8"))["default_scheme"] == "dsn"


def test_overview_refuses_bad_reports(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no ablation\.json found"):
        write_overview([], tmp_path / "o.md", [])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ablation.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad / 'ablation.json'}: not an ablation.json")):
        write_overview([bad], tmp_path / "o.md", [])
    for name in ("a", "b"):
        write_report(summarize(_runs(), "e", "liver"), tmp_path / name, [])
    with pytest.raises(ValueError, match="two reports of the same task"):
        write_overview([tmp_path / "a", tmp_path / "b"], tmp_path / "o.md", [])
    assert not (tmp_path / "o.md").exists()


def test_metric_class_names_the_class_and_the_aggregate() -> None:
    assert metric_class("val.dice.liver") == ("liver", "mean")
    assert metric_class("val.dice_global.tumour") == ("tumour", "global")
    assert metric_class("val.dice") == ("", "mean") and metric_class("val.dice_global") == ("", "global")
    with pytest.raises(ValueError, match="not a validation Dice"):
        metric_class("val.diceliver")
    lung = summarize(_lung_runs(), "e", "lung")
    assert lung.metric == "val.dice_global.tumour" and len(lung.arms) == 12  # the lung default


def test_other_classes_are_reported_beside_the_main_metric() -> None:
    runs = _runs()
    for r in runs:  # the liver arms also logged a tumour Dice that never got anywhere, except nnunet's
        r.history["val.dice.tumour"] = [(1, 0.0), (2, 0.2 if r.params["loss.scheme"] == "nnunet" else 0.01)]
    s = summarize(runs, "medsup-ablation", "liver")
    assert s.select("nnunet", 20)[0].others == {"val.dice.tumour": 0.2}
    report = render(s, "ablation.png", [])
    assert "| scheme | tumour, n_train = 2 | tumour, n_train = 20 |" in report
    assert "| `nnunet` | 0.200 ± 0.000 | 0.200 ± 0.000 |" in report and "| `dsn` | 0.010 ± 0.000 |" in report
    assert "Best of the other per-class validation metrics" in report
    assert "other per-class validation metrics" not in render(summarize(_runs(), "e", "liver"), "a.png", [])  # none
