"""benchmarks/gpu.py, the GPU check, through its CPU fallback (fp32, tiny GPT-2): every child runs, the table has
one measured row per variant, the fused/plain switch reaches the step, and the loss-parity check passes — and
reports a failure when the losses disagree."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest

# benchmarks/ is not an installed package: import it from this checkout (the children get it on PYTHONPATH)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gpu


@pytest.mark.slow
def test_gpu_check_cpu_fallback(tmp_path):
    out = tmp_path / "GPU.md"
    work = tmp_path / "work"
    rc = gpu.main(["--cpu", "--threads", "1", "--work", str(work), "--out", str(out)])
    table = out.read_text()
    assert rc == 0, table
    assert "CPU fallback" in table
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| (sacpo fused|sacpo plain|trl live) \|.*$", table, re.M)
    }
    assert set(rows) == {"sacpo fused", "sacpo plain", "trl live"}, table
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0, row  # tokens/s, s/step
        assert float(cells[5]) > 0, row  # peak RSS (MB)
        assert re.match(r"\d[\d.e+-]*% \([68]·P·T′?\)", cells[6]), row  # MFU against the fp32 matmul probe
    assert rows["sacpo fused"].split("|")[2].strip().startswith("fused LM head")
    assert rows["sacpo plain"].split("|")[2].strip().startswith("full logits")
    assert "**Loss parity: passed** ✓" in table

    res = json.loads((work / gpu.CPU_STEP.name / "gpu.json").read_text())
    for key in ("sacpo fused", "sacpo plain"):
        assert res["runs"][key]["head_path_calls"] > 0  # the forced head_path is what the step called
        assert len(res["runs"][key]["clock"]) == gpu.CPU_STEP.steps
    assert res["parity"]["abs_diff_live"] <= 1e-4 and res["parity"]["identical_inputs"]

    # the same results with sacpo's loss off by 1e-3: the check fails and says so
    bad = copy.deepcopy(res)
    bad["parity"]["sacpo_loss"] += 1e-3
    bad["parity"]["abs_diff_live"] = abs(bad["parity"]["sacpo_loss"] - bad["parity"]["trl_loss_live"])
    assert gpu.write_table(bad, tmp_path / "bad.md") is False
    assert "**Loss parity: FAILED**" in (tmp_path / "bad.md").read_text()
