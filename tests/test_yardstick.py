"""The yardstick judges the shapes data set's own images right, mismatched prompts and junk images wrong."""

import numpy as np
import pytest
from PIL import ImageFilter

from latentdiffusion.data.shapes import COLOURS, SHAPES, ShapesDataset, all_combinations, caption_for
from latentdiffusion.errors import DataError
from latentdiffusion.yardstick import adherence, judge, parse_prompt

N = 500


def _other(options, current, i):
    others = [o for o in options if o != current]
    return others[i % len(others)]


@pytest.fixture(scope="module", params=[32, 64])
def real(request):
    ds = ShapesDataset(size=request.param, length=N, seed=123)
    return [ds[i] for i in range(N)]


def test_real_images_judged_right(real):
    judgements = [judge(image, caption) for image, caption, _ in real]
    assert np.mean([j.ok for j in judgements]) >= 0.98
    assert np.mean([j.size_ok for j in judgements]) >= 0.98
    assert np.mean([j.background_ok for j in judgements]) >= 0.98
    assert adherence([im for im, _, _ in real], [c for _, c, _ in real]) >= 0.98


def test_mismatched_prompts_judged_wrong(real):
    wrong_colour = [
        judge(image, caption_for({**a, "colour": _other(list(COLOURS), a["colour"], i)}))
        for i, (image, _, a) in enumerate(real)
    ]
    wrong_shape = [
        judge(image, caption_for({**a, "shape": _other(SHAPES, a["shape"], i)})) for i, (image, _, a) in enumerate(real)
    ]
    assert np.mean([not j.ok and not j.colour_ok for j in wrong_colour]) >= 0.95
    assert np.mean([not j.ok and not j.shape_ok for j in wrong_shape]) >= 0.95


def test_blurred_noisy_images_still_judged_right():
    ds = ShapesDataset(size=32, length=300, seed=7)
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(len(ds)):
        image, caption, _ = ds[i]
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
        images.append(np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8))
        prompts.append(caption)
    assert adherence(images, prompts) >= 0.95


@pytest.mark.parametrize("size", [32, 64])
def test_noise_and_blank_images_judged_wrong(size):
    rng = np.random.default_rng(1)
    prompts = [caption_for(c) for c in all_combinations()]
    junk = []
    for i in range(60):
        junk.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # uniform noise
        junk.append(np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8))  # gray noise
        blank = np.full((size, size, 3), rng.integers(0, 256, 3), np.float64)
        junk.append(blank.astype(np.uint8))  # one flat colour
        junk.append(np.clip(blank + rng.normal(0, 6, blank.shape), 0, 255).astype(np.uint8))  # flat + faint noise
    assert not any(judge(im, prompts[i % len(prompts)]).ok for i, im in enumerate(junk))


def test_array_input_matches_pil():
    image, caption, _ = ShapesDataset(size=32, length=1, seed=0)[0]
    as_pil, as_uint8 = judge(image, caption), judge(np.asarray(image), caption)
    as_float = judge(np.asarray(image, dtype=np.float32) / 255.0, caption)
    assert as_pil.found == as_uint8.found == as_float.found
    assert as_pil.ok


def test_parse_prompt_synonyms_and_errors():
    assert parse_prompt("A big violet Triangle on a grey background") == {
        "colour": "purple", "shape": "triangle", "size": "large", "background": "gray"
    }
    assert parse_prompt("two red squares") == {"colour": "red", "shape": "square", "size": None, "background": None}
    with pytest.raises(DataError, match="names no shape"):
        parse_prompt("a red thing")
    with pytest.raises(DataError, match="names no colour"):
        parse_prompt("a circle on a white background")


def test_unstated_attributes_are_not_judged():
    image, _, a = ShapesDataset(size=32, length=1, seed=0)[0]
    j = judge(image, f"a {a['colour']} {a['shape']}")
    assert j.ok and j.size_ok is None and j.background_ok is None


def test_adherence_counts_fraction():
    ds = ShapesDataset(size=32, length=10, seed=4)
    images = [ds[i][0] for i in range(10)]
    prompts = [ds[i][1] if i < 5 else caption_for({**ds[i][2], "colour": _other(list(COLOURS), ds[i][2]["colour"], i)})
               for i in range(10)]
    assert adherence(images, prompts) == pytest.approx(0.5)
    with pytest.raises(DataError):
        adherence(images, prompts[:3])
    with pytest.raises(DataError, match=r"\(H, W, 3\) image array"):
        judge(np.zeros((4, 4)), "a red circle")


def test_stars_of_builtin_shapes_star_are_judged_and_told_from_the_other_shapes():
    from latentdiffusion.data.shapes import ALL_SHAPES

    ds = ShapesDataset(size=32, length=200, seed=11, shapes=ALL_SHAPES)
    items = [ds[i] for i in range(len(ds))]
    stars = [(image, caption) for image, caption, a in items if a["shape"] == "star"]
    assert len(stars) > 30
    assert adherence([im for im, _ in stars], [c for _, c in stars]) >= 0.98
    as_star = [judge(image, caption_for({**a, "shape": "star"})) for image, _, a in items if a["shape"] != "star"]
    assert np.mean([not j.shape_ok for j in as_star]) >= 0.98  # circles, squares, triangles are no stars
