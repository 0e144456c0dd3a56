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
            batch_size=8,
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
        assert r["models_evaluated"] == 8 and r["steps"] == [1, 1, 1, 1], r
        assert len(r["phases"]["step2"]) == 3
    for stage in res["parity"]["stages"].values():
        assert stage["identical_inputs"] and stage["abs_diff_live"] <= 1e-4
