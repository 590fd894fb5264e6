from pathlib import Path

import pytest

from autoseg.config import Config, config_to_dict, load_config, load_run_config
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
    assert cfg.data.images == Path("imgs").resolve()  # resolved at the door: a saved config means the same files
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


def test_input_paths_are_resolved_and_a_runs_config_follows_the_run(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.images": "d/images", "data.masks": "~/m", "reps.embedder_weights": "w.pt",
                             "train.teacher": "other/best/model.pt"})
    assert cfg.data.images == tmp_path / "d" / "images" and cfg.data.masks == Path.home().resolve() / "m"
    assert cfg.reps.embedder_weights == tmp_path / "w.pt" and cfg.train.teacher == str(tmp_path / "other/best/model.pt")
    assert load_config(None, {"train.teacher": "reference"}).train.teacher == "reference"
    # A run made in tmp_path with its data inside it, then moved: the data is read where it now is.
    moved = tmp_path / "moved"
    (moved / "data" / "images").mkdir(parents=True)
    (moved / "config.yml").write_text(f"out: {tmp_path}/runs/a\ndata:\n  images: {tmp_path}/runs/a/data/images\n"
                                      f"  masks: {tmp_path}/elsewhere/masks\n")
    run_cfg = load_run_config(moved, {"eval.mode": "window"})
    assert run_cfg.out == moved and run_cfg.data.images == moved / "data" / "images"
    assert run_cfg.data.masks == tmp_path / "elsewhere" / "masks"  # not inside the run: kept as saved
    assert run_cfg.eval.mode == "window"
    # as runs made before paths were resolved saved them: relative to where the search started
    (moved / "config.yml").write_text("out: runs/a\ndata:\n  images: runs/a/data/images\n")
    monkeypatch.chdir(tmp_path / "moved" / "data")
    assert load_run_config(moved).data.images == moved / "data" / "images"
