"""benchmarks/workflow.py through the driver on the tiny GPT-2 at its smallest: the parity child and one sacpo and
one TRL workflow child run, the report has the workflow table with both targets and equal first-batch losses."""

import json
import re
import sys
from pathlib import Path

import pytest

# benchmarks/ is not an installed package: import it from this checkout (the children get it on PYTHONPATH)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import run


@pytest.mark.slow
def test_workflow_quick_child(tmp_path, monkeypatch):
    plan = run.make_plan(quick=True, reps=None)
    plan.workflows = [
        run.WorkflowConfig(
            "tiny-full",
            "tiny",
            False,
            n_rows=8,
            batch_size=4,  # 2 steps per stage: one step interval each for the time split
            reps=1,
            n_prompts=2,
            n_samples=1,
            max_new_tokens=4,
        )
    ]
    monkeypatch.setattr(run, "make_plan", lambda quick, reps: plan)
    out, work = tmp_path / "R.md", tmp_path / "work"
    argv = ["--quick", "--only", "wf", "--threads", "1", "--work", str(work), "--out", str(out)]
    assert run.main([*argv, "--profile", "never"]) == 0
    table = out.read_text()
    rows = {
        m.group(1): [c.strip() for c in m.group(0).strip("|").split("|")]
        for m in re.finditer(r"^\| (sacpo `run_pipeline`|TRL DPOTrainer)[^|]*\|.*$", table, re.M)
    }
    assert set(rows) == {"sacpo `run_pipeline`", "TRL DPOTrainer"}, table
    for cells in rows.values():
        assert float(cells[1]) > 0 and float(cells[2]) >= float(cells[3]) > 0, (
            cells
        )  # wall, peak RSS (all, training)
        assert float(cells[8]) > 0, cells  # tokens generated
    assert re.search(r"\| workflow tiny-full: sacpo ÷ TRL wall time ≤ 0\.4 \| [\d.]+ \| [✓✗] \|", table)
    assert re.search(r"\| workflow tiny-full: sacpo ÷ TRL peak RSS ≤ 0\.75 \| [\d.]+ \| [✓✗] \|", table)
    assert (
        "| workflow tiny-full: equal first-batch losses (step 1 and step 2, ≤ 0.0001) | equal | ✓ |" in table
    )

    res = json.loads((work / "results.json").read_text())["workflows"][0]
    for side in ("sacpo", "trl"):
        r = res["runs"][side][0]
        assert r["models_evaluated"] == 8 and r["steps"] == [2, 2, 2, 2], r
        assert len(r["phases"]["step2"]) == 3
        assert r["optimizer_steps"]["n"] == 8 and 0 < r["optimizer_steps"]["total_s"] < r["seconds"], r
    assert len(res["runs"]["sacpo"][0]["ref_pass_s"]) == 2  # step 1's and the sweep's shared one
    assert re.search(r"Where the time goes: sacpo's 8 optimizer steps took [\d.]+ s each", table), table
    for stage in res["parity"]["stages"].values():
        assert stage["identical_inputs"] and stage["abs_diff_live"] <= 1e-4


def test_step_seconds_leaves_each_stages_first_step_out_of_the_median():
    from benchmarks.workflow import step_seconds

    # stage 1 ends its steps at 10, 11, 13 (intervals 1, 2); stage 2 at 20, 23 (interval 3): median 2, 5 steps
    assert step_seconds([10.0, 11.0, 13.0, 20.0, 23.0], [3, 2]) == {"n": 5, "median_s": 2.0, "total_s": 10.0}
    assert step_seconds([1.0, 2.0], [1, 1]) == {"n": 2, "median_s": None, "total_s": None}
    assert "error" in step_seconds([1.0, 2.0], [3])
