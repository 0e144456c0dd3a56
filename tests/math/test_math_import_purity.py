"""sacpo.math is pure: importing it pulls in torch only, never the HF stack (transformers, trl, ...)."""

import ast
import subprocess
import sys
from pathlib import Path

import sacpo.math

HEAVY = ("transformers", "trl", "accelerate", "peft", "datasets", "safetensors", "tokenizers")
MATH_DIR = Path(sacpo.math.__file__).parent


def test_import_does_not_load_hf_stack():
    code = (
        "import sys\n"
        "import sacpo.math\n"
        "import sacpo.math.kl, sacpo.math.logprobs, sacpo.math.merging, sacpo.math.preference\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not loaded, loaded\n"
        "assert 'torch' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_sources_import_only_stdlib_torch_numpy_and_sacpo_math():
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy"}  # DESIGN.md: math is torch/numpy only
    files = sorted(MATH_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "kl.py", "logprobs.py", "merging.py", "preference.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import stays inside sacpo.math
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in allowed or name == "sacpo.math" or name.startswith("sacpo.math.")
                assert ok, f"{path.name}:{node.lineno} imports {name}"


def test_public_api_exported():
    expected = {
        "KL_ESTIMATORS",
        "LOSSES",
        "MergeError",
        "PreferenceLossOutput",
        "dpo_loss",
        "get_kl_estimator",
        "get_loss",
        "ipo_loss",
        "kl_health",
        "kl_k1",
        "kl_k2",
        "kl_k3",
        "kto_loss",
        "kto_reference_point",
        "linear_merge",
        "lora_delta",
        "masked_mean",
        "masked_sum",
        "merge_lora_deltas",
        "sequence_kl",
        "token_logprobs",
    }
    assert expected <= set(sacpo.math.__all__)
    for name in sacpo.math.__all__:
        assert hasattr(sacpo.math, name), name
