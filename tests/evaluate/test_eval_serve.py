"""End to end against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1 generates the evaluation
samples (generator: openai) and serves the LLM judge; a rerun sends no request.

The judge is a tiny GPT-2 rigged to answer "A" to everything (final layer norm zeroed, its bias along the
embedding of "A", that embedding made the longest, so "A" is the argmax at every position): a maximally
position-biased judge, which the position swap must turn into ties with a consistency of 0.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TEMPLATE = "user: 'Q: {prompt}\\nA: {response_a}\\nB: {response_b}\\nBetter:'\n"
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def rigged_judge(src: Path, out: Path, token: str = "A") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    (tid,) = tok(token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        wte = model.transformer.wte.weight  # (V, H), tied with the LM head
        wte[tid] *= 4 * wte.norm(dim=-1).max() / wte[tid].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[tid])
    model.save_pretrained(out)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"transformers serve did not answer in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path):
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(exe if exe.exists() else shutil.which("transformers")), "serve", "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu", "--log-level", "info"]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_up(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def posts(log: Path, route: str) -> int:
    return log.read_text().count(f'"POST /v1/{route} HTTP/1.1" 200')


def test_eval_through_transformers_serve(tiny_model, other_model, tmp_path, server, one_torch_thread):
    from sacpo.config import from_dict
    from sacpo.recipes.eval import EvalConfig, run_eval
    from sacpo.worlds.toyworld.language import all_prompts

    url, log = server
    judge = rigged_judge(tiny_model, tmp_path / "judge")
    template = tmp_path / "short.yaml"
    template.write_text(TEMPLATE)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(all_prompts()[:3]))
    cfg = from_dict(
        EvalConfig,
        {
            "output_dir": str(tmp_path / "eval"),
            "prompts": str(prompts),
            "sft": str(tiny_model),
            "models": {"other": {"dir": str(other_model), "family": "sacpo", "param": 0.1}},
            "n_samples": 2,
            "max_new_tokens": 4,
            "n_boot": 50,
            "generator": {"kind": "openai", "base_url": url},
            "judges": [
                {"kind": "llm", "name": "rigged", "base_url": url, "model": str(judge), "criterion": str(template),
                 "max_tokens": 1},
                {"kind": "oracle", "name": "toyworld"},
            ],
        },
    )  # fmt: skip
    results = run_eval(cfg, show_progress=False)
    out = tmp_path / "eval"
    meta = json.loads((out / "samples" / "other" / "samples.meta.json").read_text())
    assert meta["generator"] == "openai" and meta["usage"]["requests"] == 6  # 3 prompts × 2 samples
    assert posts(log, "completions") == 12  # both models
    assert all(abs(m.kl) < 1e3 for m in results) and results[0].kl == 0.0
    record = json.loads((out / "judges.json").read_text())
    r = record["models"]["other"]["rigged"]
    # "A" in both orders: every pair valid, every pair a tie by disagreement, consistency 0
    assert r["n_valid"] == 6 and r["invalid"] == 0 and r["win"][0] == 0.5
    assert r["consistency"] == 0.0 and r["ties_by_disagreement"] == 6
    chats = posts(log, "chat/completions")
    assert chats == record["judges"][0]["usage"]["requests_sent"] > 0
    assert "Judges: win rate vs SFT" in (out / "report.md").read_text()
    # the rerun: samples and every judgment come from the caches, not one request
    run_eval(cfg, show_progress=False)
    assert posts(log, "completions") == 12 and posts(log, "chat/completions") == chats
    again = json.loads((out / "judges.json").read_text())
    assert again["judges"][0]["usage"]["requests_sent"] == 0 and again["models"] == record["models"]
