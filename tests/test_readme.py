"""The README's example config is a config autoseg accepts."""
import re
from pathlib import Path

from autoseg.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_example_loads(tmp_path):
    text = README.read_text()
    section = text.split("### Config", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "config.yml"
    path.write_text(block)
    cfg = load_config(path)
    assert cfg.search.pruner == "halving" and cfg.search.max_minutes == 30
