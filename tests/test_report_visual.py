"""The example strips and overlays a person looks at: captioned panels, a legend of the classes shown,
and class colours that stand out from the image."""

from __future__ import annotations

import numpy as np

from autoseg.visual import PANEL_TITLES, classes_shown, example_strip, palette
from edge_agent.predict import class_edges, overlay

NAMES = ["background", "road", "tree", "car"]


def _scene(h: int = 40, w: int = 60):
    rng = np.random.default_rng(0)
    image = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)  # a mid-grey, busy photo
    mask = np.zeros((h, w), np.int64)
    mask[10:30, 5:25] = 1
    pred = mask.copy()
    pred[12:20, 40:55] = 2
    pred[0, 0] = -1
    return image, mask, pred


def test_classes_shown_are_those_in_truth_or_prediction():
    _, mask, pred = _scene()
    assert classes_shown(mask, pred) == [-1, 0, 1, 2]
    assert classes_shown(mask) == [0, 1]


def test_a_strip_has_captions_over_its_panels_and_a_legend_of_the_classes_shown():
    image, mask, pred = _scene()
    pal = palette(len(NAMES))
    strip = example_strip(image, mask, pred, pal, NAMES)
    h, w = mask.shape
    assert strip.shape[1] == 3 * w + 8 and strip.shape[0] > h + 30  # a caption band above, a legend below
    top = strip[: strip.shape[0] - h]
    caption = strip[:18]
    assert (caption < 100).all(axis=2).sum() > 20, "no caption text drawn"
    for i in range(len(PANEL_TITLES)):  # each panel's caption sits over that panel
        assert (caption[:, i * (w + 4): i * (w + 4) + w] < 100).all(axis=2).any(), PANEL_TITLES[i]
    legend = strip[18 + h:]
    colours = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    for c in (0, 1, 2):  # the swatches of the classes shown, and grey for ignored pixels
        assert tuple(pal[c].tolist()) in colours, NAMES[c]
    assert tuple(pal[-1].tolist()) in colours
    assert tuple(pal[3].tolist()) not in colours, "car is not in this image: no swatch"
    assert top.shape[0] > 0


def test_a_legend_too_wide_for_one_row_wraps():
    names = [f"a rather long class name {i}" for i in range(8)]
    mask = np.arange(8).repeat(4).reshape(4, 8)
    one_row = example_strip(np.zeros((4, 8, 3), np.uint8), mask[:, :1] * 0, mask[:, :1] * 0, palette(8), names)
    many = example_strip(np.zeros((4, 8, 3), np.uint8), mask, mask, palette(8), names)
    assert many.shape[0] > one_row.shape[0] + 3 * 14


def test_overlay_colours_stand_out_and_borders_are_drawn_in_full_colour():
    image, mask, _ = _scene()
    pal = palette(len(NAMES))  # class 0 (background) is black here
    out = overlay(image, mask, pal)
    inside = out[15:25, 10:20].reshape(-1, 3).astype(float)
    colour = pal[1].astype(float)
    # Inside a region: at least 60 % class colour, so it reads against the photo.
    ratio = np.abs(inside - colour).mean() / np.abs(image[15:25, 10:20].reshape(-1, 3) - colour).mean()
    assert ratio < 0.41, ratio  # predict's old alpha 0.45 left 0.55 of the photo
    # The background (black) is left as the image, not darkened.
    assert np.array_equal(out[35:, 30:], image[35:, 30:])
    # Each region's border is drawn in its full colour.
    edge = class_edges(mask)
    assert edge[10, 5:25].any() and edge[10:30, 5].all()
    assert (out[10:30, 5] == pal[1]).all()


def test_overlay_drawn_band_by_band_equals_the_whole_image():
    image, mask, _ = _scene()
    pal = palette(len(NAMES))
    whole = overlay(image, mask, pal)
    bands = [overlay(image[y:y + 7], mask[y:y + 7], pal, above=mask[y - 1] if y else None)
             for y in range(0, mask.shape[0], 7)]
    assert np.array_equal(np.concatenate(bands), whole)


def test_the_report_captions_the_examples_and_shows_the_class_colours(tmp_path):
    from test_report import CLASSES, make_run

    from autoseg.report import write_report

    run = make_run(tmp_path / "run")
    rep = write_report(run)
    pal = palette(len(CLASSES))
    assert rep["class_colours"] == [{"name": n, "rgb": pal[i].tolist()} for i, n in enumerate(CLASSES)]
    page = (run / "report.html").read_text()
    assert "<figcaption>img8.png: image | truth | prediction</figcaption>" in page
    assert f'style="background:rgb({",".join(map(str, pal[1].tolist()))})"></span>road' in page
    assert "Class colours: background rgb(0, 0, 0), road" in (run / "report.md").read_text()
