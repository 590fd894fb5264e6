from pathlib import Path

import pytest

from autoseg.config import Config, config_to_dict, load_config
from autoseg.errors import InputError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yml"
    p.write_text(text)
    return p


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.tiles.size == 64 and cfg.search.objective == "penalty"


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "tiles:\n  size: 128\n  overlap: 0.5\nsearch:\n  space:\n    levels: [1, 2]\n")
    cfg = load_config(p, {"tiles.size": 96, "data.images": "imgs", "search.trials": None})
    assert cfg.tiles.size == 96 and cfg.tiles.overlap == 0.5
    assert cfg.search.space.levels == [1, 2]
    assert cfg.data.images == Path("imgs")
    assert cfg.search.trials == 20  # a None override leaves the default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiles:\n  overlap: 1.5\n", "tiles.overlap: must be in [0.0, 1.0), got 1.5"),
        ("tiles:\n  sise: 64\n", "tiles.sise: unknown key"),
        ("tiles:\n  size: big\n", "tiles.size: must be an integer, got 'big'"),
        ("tiles:\n  size: 4\n", "tiles.size: must be >= 8, got 4"),
        ("search:\n  objective: fastest\n", "search.objective: must be one of penalty, pareto"),
        ("search:\n  space:\n    kernels: [3, 4]\n", "search.space.kernels: must be kernels from {3, 5, 7}"),
        ("search:\n  space:\n    levels: []\n", "search.space.levels: must be levels in 1..6"),
        ("train:\n  augment: maybe\n", "train.augment: must be true or false"),
        ("device: local\n", "device: must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("tiles: [\n", "is not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(InputError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read config"):
        load_config(tmp_path / "nope.yml")


def test_round_trip_through_yaml(tmp_path):
    import yaml

    cfg = load_config(None, {"data.images": "a", "train.class_weights": [1.0, 2.0]})
    again = load_config(write(tmp_path, yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_seed_must_be_an_unsigned_32_bit_integer() -> None:
    with pytest.raises(InputError, match=r"^seed: must be in \[0, 4294967295\], got -1$"):
        load_config(overrides={"seed": -1})


def test_a_config_that_is_not_utf8_is_one_line(tmp_path) -> None:
    path = tmp_path / "c.yml"
    path.write_bytes(b"data: {images: \"\xff\xfe\"}\n")
    with pytest.raises(InputError, match=r"c\.yml: is not UTF-8 text"):
        load_config(path)
