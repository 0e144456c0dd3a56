"""`sacpo theory [--out DIR]`: the exact checks on finite output spaces (`sacpo.evaluate.theory`), written as
theory.md (tables) and bon_kl.png, win_vs_kl.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sacpo.evaluate.theory import compute_theory, plot_bon_kl, plot_win_vs_kl, theory_markdown
from sacpo.fsutil import atomic_write_text

THEORY_FILE = "theory.md"


def run_theory(out_dir: str | Path, show_progress: bool = False, seed: int = 0) -> dict[str, Any]:
    """Compute (a)–(c), write theory.md, bon_kl.png and win_vs_kl.png to out_dir; return the numbers, with
    files (name → path) and markdown (the text of theory.md)."""
    out = Path(out_dir)
    res = compute_theory(seed, show_progress)
    res["files"] = {
        "bon_kl.png": str(plot_bon_kl(res["bon_kl"], out / "bon_kl.png")),
        "win_vs_kl.png": str(plot_win_vs_kl(res["win_vs_kl"], out / "win_vs_kl.png")),
    }
    text = theory_markdown(res)
    res["files"][THEORY_FILE] = str(atomic_write_text(out / THEORY_FILE, text))
    res["markdown"] = text
    return res
