"""Windowing, boxes, crops, Dice; prompt presets and free text."""

import numpy as np
import pytest

from SaLIPSegmentLib.errors import InputError, UnknownPresetError
from SaLIPSegmentLib.imaging import dice, mask_to_box, masked_crop, robust_window, window_to_uint8
from SaLIPSegmentLib.prompts import free_text_prompt, get_preset, load_presets, resolve_prompt


def test_window_maps_range_and_non_finite_values():
    image = np.array([[-10.0, 0.0, 50.0], [100.0, np.nan, np.inf], [-np.inf, 25.0, 1e9]])
    out = window_to_uint8(image, (0.0, 255.0))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 50], [100, 0, 255], [0, 25, 255]]


def test_robust_window_ignores_outliers_and_reports_no_contrast():
    values = np.concatenate([np.linspace(0, 100, 10_000), [1e6]])
    low, high = robust_window(values)
    assert 0 <= low < 1 and 99 < high < 101
    assert robust_window(np.full((4, 4), 7.0)) is None
    assert robust_window(np.full((4, 4), np.nan)) is None


def test_box_and_masked_crop():
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:4, 3:7] = True
    mask[3, 6] = False
    assert mask_to_box(mask) == (3, 2, 6, 3)
    assert mask_to_box(np.zeros((3, 3), bool)) is None
    image = np.full((6, 8, 3), 9, dtype=np.uint8)
    crop = masked_crop(image, mask, mask_to_box(mask))
    assert crop.shape == (2, 4, 3)
    assert crop[1, 3].tolist() == [0, 0, 0] and crop[0, 0].tolist() == [9, 9, 9]


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_every_preset_is_complete():
    presets = load_presets()
    assert {"brain", "lungs", "fetal_head", "liver", "kidneys", "heart", "bladder", "prostate"} <= set(presets)
    for preset in presets.values():
        assert preset.sentences and all(0 <= c <= 1 for c in preset.color)
    assert presets["lungs"].top_k == 2 and presets["brain"].top_k == 1


def test_aliases_and_display_names_select_presets():
    assert resolve_prompt("Lung fields").name == "lungs"
    assert resolve_prompt("  Fetal head ").name == "fetal_head"
    assert get_preset("fetal-head").name == "fetal_head"


def test_free_text_becomes_a_stable_sentence_ensemble():
    prompt = resolve_prompt("left  adrenal gland")
    assert not prompt.is_preset and prompt.display_name == "left adrenal gland"
    assert len(prompt.sentences) >= 3 and all("left adrenal gland" in s for s in prompt.sentences)
    assert prompt.color == free_text_prompt("left adrenal gland").color
    assert prompt.color != free_text_prompt("spleen").color


@pytest.mark.parametrize("text", ["", "   ", "x" * 500])
def test_empty_or_huge_prompt_is_refused(text):
    with pytest.raises(InputError):
        resolve_prompt(text)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UnknownPresetError, match="brain.*lungs"):
        get_preset("spleenish")
