"""dap_ray.study: the plan composes against the real schema, the statistics pair by seed, and a tiny
study runs end to end through real distill runs on the session Ray, resumes, and grows by a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sp

from dap_ray.cli import compose
from dap_ray.config import to_structured
from dap_ray.study import (
    Cell,
    StudyPlan,
    best_knobs,
    cell_dir,
    gamma_points,
    main,
    paired_rows,
    plan_cells,
    run_study,
    trials_table,
)


def _row(group: str, ipc: int, seed: int, method: str, acc: float, gamma: float | None = None, **m: float) -> dict:
    return {"group": group, "cell": f"ipc{ipc}/seed{seed}/{group}", "ipc": ipc, "seed": seed, "method": method, "arch": "convnet",
            "gamma": gamma, "acc": acc, "inv_d": m.get("inv_d"), "fd": m.get("fd"), "spread": m.get("spread"), "strength": None}


@pytest.mark.unit
def test_default_plan_composes_against_the_distill_schema():
    plan = StudyPlan()
    cells = plan_cells(plan)
    # grid and rbf per (IPC, seed), then the γ runs; every name is unique (one run directory each)
    assert len(cells) == 2 * len(plan.ipcs) * len(plan.seeds) + len(plan.gamma_ipcs) * len(plan.gamma_seeds) * len(plan.gammas)
    assert len({c.name for c in cells}) == len(cells)
    tuned = [c for c in plan_cells(plan, ["method.gamma=3.5", "method.layer='2'"]) if c.group == "tuned"]
    assert [c.seed for c in tuned] == list(plan.seeds) and {c.ipc for c in tuned} == {2}
    picks = {c.group: c for c in cells} | {"tuned": tuned[-1]}
    for group, c in picks.items():
        cfg = to_structured(compose("distill", [*c.overrides, f"out_dir=/tmp/x/{c.name}"]))
        assert (cfg.seed, list(cfg.eval.seeds), cfg.ipc, list(cfg.eval.archs)) == (c.seed, [c.seed], c.ipc, ["convnet"]), group
        if group == "grid":
            assert list(cfg.methods) == list(plan.methods)
        else:
            assert list(cfg.methods) == ["dap"]
    assert picks["rbf"].labels == {"dap": "dap_rbf"}
    rbf = to_structured(compose("distill", list(picks["rbf"].overrides)))
    assert (rbf.method.kernel, rbf.bank.keep_per_class) == ("rbf", plan.rbf_keep)
    gam = to_structured(compose("distill", list(picks["gamma"].overrides)))
    assert gam.method.gamma == plan.gammas[-1] and picks["gamma"].labels == {"dap": f"dap γ={plan.gammas[-1]:g}"}
    assert gam.method.gamma != to_structured(compose("distill", [])).method.gamma
    tun = to_structured(compose("distill", list(picks["tuned"].overrides)))
    assert (tun.method.gamma, tun.method.layer) == (3.5, "2")


@pytest.mark.unit
def test_paired_rows_pair_by_seed_and_match_ttest_rel():
    rng = np.random.default_rng(0)
    van = rng.normal(80, 3, size=5)
    dap = van + rng.normal(1.0, 1.0, size=5)
    rows = [_row("grid", 2, s, "vanilla", float(v)) for s, v in enumerate(van)]
    rows += [_row("grid", 2, s, "dap", float(d)) for s, d in enumerate(dap)]
    rows += [_row("gamma", 2, 0, "dap γ=40", 10.0, 40.0)]  # the γ sweep's rows never enter the grid's pairs
    rows += [_row("grid", 2, 7, "dap", 99.0)]  # a seed without its vanilla partner is left out of the pair
    (p,) = paired_rows(rows, [2], "convnet", [("dap", "vanilla")])
    ref = sp.ttest_rel(dap, van)
    lo, hi = ref.confidence_interval(0.95)
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["n"] == 5
    assert p["mean"] == pytest.approx(float(np.mean(dap - van)))
    assert (p["low"], p["high"], p["p_value"]) == (pytest.approx(lo), pytest.approx(hi), pytest.approx(ref.pvalue))
    assert p["up"] + p["down"] + p["tie"] == 5 and p["up"] == int((dap > van).sum())


@pytest.mark.unit
def test_gamma_curve_takes_vanilla_and_default_dap_from_the_grid():
    rows = [_row("grid", 2, s, "vanilla", 70.0 + s, 0.0, inv_d=4.0) for s in range(3)]
    rows += [_row("grid", 2, s, "dap", 72.0 + s, 10.0, inv_d=5.0) for s in range(3)]
    rows += [_row("gamma", 2, s, "dap γ=40", 60.0 + s, 40.0, inv_d=6.0) for s in range(3)]
    rows += [_row("grid", 2, 4, "dap", 0.0, 10.0)]  # seed 4 is not a γ-sweep seed
    rows += [_row("grid", 2, 0, "random_real", 50.0)]  # no γ
    pts = gamma_points(rows, 2, "convnet", (0, 1, 2))
    assert [p["gamma"] for p in pts] == [0.0, 10.0, 40.0]
    assert [p["acc"] for p in pts] == [[70.0, 71.0, 72.0], [72.0, 73.0, 74.0], [60.0, 61.0, 62.0]]
    assert pts[2]["inv_d"] == [6.0, 6.0, 6.0]


@pytest.mark.unit
def test_best_knobs_keep_types(tmp_path):
    # the sweep's best_config.yaml (dap_ray/tune/best.py write_best): a layer name that looks like a number stays a string
    (tmp_path / "best_config.yaml").write_text("knobs:\n  method.gamma: 3.25\n  method.layer: '2'\n  method.t_stop: 400\n")
    knobs = best_knobs(tmp_path)
    cfg = to_structured(compose("distill", knobs))
    assert (cfg.method.gamma, cfg.method.layer, cfg.method.t_stop) == (3.25, "2", 400)


@pytest.mark.unit
def test_trials_table_best_first(tmp_path):
    (tmp_path / "results.csv").write_text(
        "trial_id,method.gamma,method.layer,method.t_stop,val_acc,val_acc_best,epochs,reports,status\n"
        "a,2.5,1,0,0.5,0.61,20,4,stopped\n"
        "b,31.7,2,400,0.8,0.83,60,12,completed\n"
        "c,7.0,2,600,,,0,0,error\n")
    (table,) = trials_table(tmp_path)
    lines = table.splitlines()
    assert lines[0] == "| method.gamma | method.layer | method.t_stop | val acc (%) | epochs | status |"
    assert lines[2] == "| 31.7 | 2 | 400 | 83.0 | 60 | completed |"
    assert lines[3] == "| 2.5 | 1 | 0 | 61.0 | 20 | stopped |"
    assert lines[4].endswith("| error |") and len(lines) == 5
    assert trials_table(tmp_path / "missing") == []


@pytest.mark.unit
def test_cli_rejects_bad_seed_count(capsys):
    assert main(["--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["--out", "s3://bucket/study"]) == 2
    assert "local folder" in capsys.readouterr().err


@pytest.mark.integration
def test_tiny_study_end_to_end_resumes_and_grows(tmp_path, tiny_dit_dir, cache_dir, ray_session):
    out = tmp_path / "study"
    plan = StudyPlan(ipcs=(1,), seeds=(0, 1), methods=("random_real", "vanilla", "dap"), rbf=True, rbf_keep=4,
                     gamma_ipcs=(1,), gammas=(40.0,), gamma_seeds=(0, 1), tune=False)
    ov = [f"model.path={tiny_dit_dir}", f"cache_dir={cache_dir}", "sampler.steps=4", "sampler.batch_size=2", "eval.epochs=2",
          "eval.max_test=60", "dataset.classes=[0,1]", "eval.metrics=true"]
    md = Path(run_study(plan, str(out), ov, docs=str(tmp_path / "docs")))
    cells = plan_cells(plan)
    assert all((cell_dir(str(out), c) / "results.json").exists() for c in cells)
    text = md.read_text()
    assert f"{len(cells)} of {len(cells)} distill runs finished" in text
    for fig in ("accuracy_vs_ipc", "paired_differences", "gamma_tradeoff", "pairs_vanilla_dap"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 0, fig
            assert (tmp_path / "docs" / "figures" / f"{fig}.{ext}").exists()
        assert f"figures/{fig}.png" in text

    # study.csv holds exactly the runs' trainings: 3 grid methods + dap_rbf per seed, and the γ runs
    import pandas as pd

    csv = pd.read_csv(out / "study.csv")
    assert len(csv) == 2 * 4 + 2
    assert set(csv["method"]) == {"random_real", "vanilla", "dap", "dap_rbf", "dap γ=40"}

    # the table's paired difference is the runs' own accuracies, seed by seed
    def acc(cell: Cell, method: str) -> float:
        res = json.loads((cell_dir(str(out), cell) / "results.json").read_text())
        return 100.0 * next(r["acc"] for r in res["rows"] if r["method"] == method)

    grid = [c for c in cells if c.group == "grid"]
    d = [acc(c, "dap") - acc(c, "vanilla") for c in grid]
    line = next(ln for ln in text.splitlines() if ln.startswith("| dap − vanilla | 1 |"))
    assert f"| {np.mean(d):+.1f} |" in line
    assert math.isclose(float(line.split("|")[4]), np.mean(d), abs_tol=0.051)

    # a second call runs nothing: every run directory is left as it was
    stamps = {c.name: (cell_dir(str(out), c) / "results.json").stat().st_mtime_ns for c in cells}
    run_study(plan, str(out), ov)
    assert {c.name: (cell_dir(str(out), c) / "results.json").stat().st_mtime_ns for c in cells} == stamps

    # one more seed: only its runs are made
    more = StudyPlan(**{**plan.__dict__, "seeds": (0, 1, 2)})
    text = Path(run_study(more, str(out), ov)).read_text()
    assert {c.name: (cell_dir(str(out), c) / "results.json").stat().st_mtime_ns for c in cells} == stamps
    new = [c for c in plan_cells(more) if c.name not in stamps]
    assert {c.name for c in new} == {"ipc1/seed2/grid", "ipc1/seed2/rbf"}
    assert all((cell_dir(str(out), c) / "results.json").exists() for c in new)
    assert "| dap − vanilla | 1 | 3 |" in text
