"""Every shipped configs/*.yaml loads into the config class of the command its header names, and that command is
one the CLI has: a renamed field or a moved class breaks this test, not a user's first run."""

from pathlib import Path

import pytest

from sacpo.cli import CONFIG_CLASSES, build_parser, config_class
from sacpo.config import load_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _command(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    words = first.lstrip("# ").split()
    assert words[:1] == ["sacpo"] and len(words) >= 3, f"{path.name}: header must be `# sacpo CMD {path}`"
    assert words[2] == f"configs/{path.name}", f"{path.name}: the header names {words[2]}"
    return words[1]


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    command = _command(path)
    assert command in CONFIG_CLASSES, f"{path.name}: `sacpo {command}` takes no CONFIG"
    build_parser().parse_args([command, str(path)])  # the CLI accepts the header's command line
    cfg = load_config(config_class(command), path)
    assert to_dict(cfg)  # a full, resolved config
