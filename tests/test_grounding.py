"""Tests for qwenvl.grounding: parsing model text, unit conversions, IoU by hand, and drawing."""

from __future__ import annotations

import logging
import random
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from qwenvl import grounding
from qwenvl.grounding import (
    Box,
    GroundedObject,
    Quad,
    denormalize_box,
    denormalize_objects,
    draw_boxes,
    first_box,
    format_box,
    iou,
    normalize_box,
    parse_grounding,
)
from qwenvl.images import load_image

# --------------------------------------------------------------------------------------------------------
# parse_grounding / first_box
# --------------------------------------------------------------------------------------------------------


def test_parse_single_ref_and_box() -> None:
    text = "<ref>a dog</ref><box>(100,200),(300,400)</box>"
    assert parse_grounding(text) == [GroundedObject(ref="a dog", boxes=[Box(100, 200, 300, 400)])]


def test_parse_several_boxes_after_one_ref_with_whitespace() -> None:
    text = "Here: <ref> two dogs </ref>\n<box>( 1 , 2 ),( 3 , 4 )</box> <box>(5,6),(7,8)</box>."
    (obj,) = parse_grounding(text)
    assert obj.ref == "two dogs"
    assert obj.boxes == [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]


def test_parse_box_without_ref_and_ref_without_box() -> None:
    text = "<ref>the sky</ref> is above <box>(0,0),(999,500)</box> and <ref>a cat</ref>"
    objects = parse_grounding(text)
    # Prose between </ref> and <box> detaches the box, as in the official tokenizer.
    assert objects == [
        GroundedObject(ref="the sky"),
        GroundedObject(ref=None, boxes=[Box(0, 0, 999, 500)]),
        GroundedObject(ref="a cat"),
    ]


def test_parse_quad_attaches_to_ref() -> None:
    text = "<ref>sign</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>"
    (obj,) = parse_grounding(text)
    assert obj.ref == "sign" and obj.boxes == []
    assert obj.quads == [Quad(((1, 2), (3, 4), (5, 6), (7, 8)))]


def test_parse_skips_malformed_and_ignores_special_tokens() -> None:
    text = (
        "<|im_start|>assistant\n"
        "<ref>good</ref><box>(1,1),(2,2)</box><|im_end|>"  # kept
        "<box>(9,9)</box>"  # one point only: skipped
        "<box>(a,b),(c,d)</box>"  # not numbers: skipped
        "<ref>nested<box>(3,3),(4,4)</box></ref>"  # unclosed ref skipped, its box kept without ref, stray </ref>
        "</box>"  # stray closer
        "<quad>(1,2),(3,4)</quad>"  # a quad needs 4 points
        "<box>(5,5),(6,6)<|endoftext|>garbage ((("  # unclosed at the end
    )
    assert parse_grounding(text) == [
        GroundedObject(ref="good", boxes=[Box(1, 1, 2, 2)]),
        GroundedObject(ref=None, boxes=[Box(3, 3, 4, 4)]),
    ]


def test_parse_never_raises_on_random_tag_soup() -> None:
    rng = random.Random(0)
    pieces = [
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<quad>",
        "</quad>",
        "(1,2)",
        ",",
        "(3,4)",
        "x",
        " ",
        "<|im_end|>",
    ]
    for _ in range(2000):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 12)))
        for obj in parse_grounding(text):
            assert all(isinstance(b, Box) for b in obj.boxes)


def test_long_runs_of_whitespace_parse_in_linear_time() -> None:
    # "\\s*,?\\s*" between points let the regex engine split a run of n spaces n ways: a model answer with a
    # few hundred thousand spaces after a point (a degenerate generation, a hostile prompt's echo) took
    # minutes in parse_grounding and first_box (the server, the eval, chat --draw). Linear now: these take
    # milliseconds (before: about ten minutes; nothing here is timed, a regression shows as a stalled suite).
    spaces = " " * 300_000
    for text in ("<box>(1,1)" + spaces + "x</box>", "(1,1)" + spaces + "x", "<box>(1,1)," + spaces + "</box>"):
        assert parse_grounding(text) == [] and first_box(text) is None
    assert first_box("<box>(1,2)," + spaces + "(3,4)</box>") == Box(1, 2, 3, 4)
    # the separators the grammar allows are unchanged
    assert first_box("(1,2) ,\n (3,4)") == Box(1, 2, 3, 4)
    assert parse_grounding("<box>(1,2) (3,4)</box>") == [GroundedObject(None, [Box(1, 2, 3, 4)])]
    assert parse_grounding("<box>(1,2),,(3,4)</box>") == []


def test_first_box_prefers_tags_then_falls_back_to_bare_pair() -> None:
    assert first_box("x <ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>") == Box(1, 2, 3, 4)
    # The official refcoco eval's prompt ends in <box> and decodes without special tokens.
    assert first_box("(12,34),(56,78)</box><|endoftext|>") == Box(12, 34, 56, 78)
    assert first_box("no box here (1,2)") is None
    assert first_box("") is None


# --------------------------------------------------------------------------------------------------------
# Conversions and formatting
# --------------------------------------------------------------------------------------------------------


def test_normalize_box_truncates_and_clamps() -> None:
    # 10.9 / 640 * 1000 = 17.03125 -> 17 ; 48 / 480 * 1000 = 100 ; 640 / 640 * 1000 = 1000 -> clamped to 999
    assert normalize_box((10.9, 48, 640, 480), 640, 480) == (17, 100, 999, 999)
    assert normalize_box(Box(-5, 0, 320, 240), 640, 480) == (0, 0, 500, 500)
    with pytest.raises(ValueError):
        normalize_box((0, 0, 1, 1), 0, 480)
    with pytest.raises(ValueError):
        normalize_box((0, 0, 1), 10, 10)


def test_denormalize_box_uses_999_by_default() -> None:
    # 333 / 999 * 1998 = 666 ; 999 / 999 * 999 = 999
    assert denormalize_box((0, 999, 333, 0), 1998, 999) == Box(0, 999, 666, 0)
    # scale=1000: 500 / 1000 * 999 = 499.5
    assert denormalize_box((500, 500, 1000, 0), 999, 999, scale=1000) == Box(499.5, 499.5, 999, 0)


def test_denormalize_objects_maps_boxes_and_quads() -> None:
    objects = [GroundedObject("a", [Box(0, 0, 999, 999)], [Quad(((0, 0), (999, 0), (999, 999), (0, 999)))])]
    (obj,) = denormalize_objects(objects, 200, 100)
    assert obj.ref == "a"
    assert obj.boxes == [Box(0, 0, 200, 100)]
    assert obj.quads == [Quad(((0, 0), (200, 0), (200, 100), (0, 100)))]


def test_format_box_and_round_trip() -> None:
    assert format_box((1, 2, 3, 4)) == "<box>(1,2),(3,4)</box>"
    assert format_box(Box(10, 20, 30.0, 999), ref="a dog") == "<ref>a dog</ref><box>(10,20),(30,999)</box>"
    assert parse_grounding(format_box((10, 20, 30, 40), ref="cat")) == [
        GroundedObject("cat", [Box(10, 20, 30, 40)])
    ]
    with pytest.raises(ValueError):
        format_box((0, 0, 1000, 10))  # outside the grid: pixel coordinates passed by mistake
    with pytest.raises(ValueError):
        format_box((0, 0, 1.5, 10))


# --------------------------------------------------------------------------------------------------------
# IoU (continuous coordinates, no +1, as torchvision's box_iou in the official eval)
# --------------------------------------------------------------------------------------------------------


def test_iou_hand_values() -> None:
    # Overlap 5x5 = 25; union 100 + 100 - 25 = 175.
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175, abs=1e-15)
    # Contained half: inter 5*10 = 50, union 100.
    assert iou((0, 0, 10, 10), (0, 0, 5, 10)) == 0.5
    assert iou(Box(2, 3, 7, 11), (2, 3, 7, 11)) == 1.0
    # With +1 pixels the first case would be 36 / (121 + 121 - 36) = 0.1747...; we keep 1/7 = 0.1428...


def test_iou_reversed_corners_disjoint_and_degenerate() -> None:
    assert iou((10, 10, 0, 0), (15, 15, 5, 5)) == pytest.approx(25 / 175, abs=1e-15)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert iou((5, 5, 5, 5), (0, 0, 10, 10)) == 0.0  # zero-area prediction
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # zero union: 0.0, not NaN


# --------------------------------------------------------------------------------------------------------
# draw_boxes
# --------------------------------------------------------------------------------------------------------


def _white(w: int = 200, h: int = 120) -> Image.Image:
    return Image.new("RGB", (w, h), "white")


def test_draw_boxes_outlines_labels_and_copies() -> None:
    image = _white()
    out = draw_boxes(image, [("dog", (20, 40, 120, 100))], colors=["#ff0000"], width=3, font_size=14)
    assert out is not image and out.size == image.size
    assert image.getpixel((20, 70)) == (255, 255, 255)  # the input is untouched
    assert out.getpixel((20, 70)) == (255, 0, 0)  # left edge
    assert out.getpixel((121, 70)) == (255, 255, 255)  # width grows inwards only
    assert out.getpixel((70, 70)) == (255, 255, 255)  # interior stays clear
    # Label background sits just above the top-left corner, filled with the object's color.
    assert out.getpixel((21, 38)) == (255, 0, 0)
    label_area = [out.getpixel((x, y)) for x in range(20, 60) for y in range(20, 40)]
    assert (255, 255, 255) in label_area  # white text on the red fill


def test_draw_boxes_grounded_objects_colors_per_object_and_quads() -> None:
    objects = [
        GroundedObject("a", [Box(10, 30, 50, 60), Box(60, 30, 90, 60)]),
        GroundedObject(None, [Box(100, 30, 150, 60)], [Quad(((160, 30), (190, 30), (190, 60), (160, 60)))]),
    ]
    out = draw_boxes(_white(), objects, colors=["#00ff00", "#0000ff"], width=2)
    assert out.getpixel((10, 45)) == (0, 255, 0)
    assert out.getpixel((60, 45)) == (0, 255, 0)  # second box of the same ref, same color
    assert out.getpixel((100, 45)) == (0, 0, 255)
    assert out.getpixel((160, 45)) == (0, 0, 255)  # quad edge


def test_draw_boxes_accepts_grayscale_and_reversed_corners() -> None:
    out = draw_boxes(Image.new("L", (50, 50), 255), [(None, (40, 40, 10, 10))], colors=["#ff0000"], width=1)
    assert out.mode == "RGB"
    assert out.getpixel((10, 25)) == (255, 0, 0)
    with pytest.raises(ValueError):
        draw_boxes(_white(), [("x", (0, 0, 1, 1))], width=0)


def test_draw_boxes_chinese_and_emoji_labels_never_crash() -> None:
    for system_fonts in (True, False):
        out = draw_boxes(_white(), [("狗 dog 🐶", (20, 40, 120, 100))], system_fonts=system_fonts)
        assert out.size == (200, 120)


def test_unrenderable_characters_fall_back_visibly() -> None:
    # Pillow's bundled font covers ASCII only; without system fonts CJK and emoji become escapes.
    runs = grounding._label_runs("dog 狗🐶", 16, system_fonts=False)
    assert "".join(text for text, _ in runs) == "dog \\u72d7\\U0001f436"
    # ... and the drawing is exactly that of the escaped text, so the loss shows on the image.
    box = (20, 40, 180, 100)
    escaped = draw_boxes(_white(), [("\\u72d7", box)], font_size=14, system_fonts=False)
    fallback = draw_boxes(_white(), [("狗", box)], font_size=14, system_fonts=False)
    assert fallback.tobytes() == escaped.tobytes()
    assert fallback.tobytes() != draw_boxes(_white(), [("", box)], font_size=14).tobytes()


def test_ascii_label_is_not_escaped() -> None:
    runs = grounding._label_runs("a dog", 16, system_fonts=False)
    assert [text for text, _ in runs] == ["a dog"]


def test_numbers_beyond_a_float_are_malformed_not_infinite() -> None:
    huge = "1" + "0" * 400  # float() of it is inf: a box nobody can draw, convert or send as JSON
    assert parse_grounding(f"<ref>a</ref><box>({huge},2),(3,4)</box>") == [GroundedObject("a")]
    assert first_box(f"({huge},2),(3,4) then (5,6),(7,8)") == Box(5, 6, 7, 8)


def test_conversions_refuse_what_is_not_a_finite_number() -> None:
    nan, inf = float("nan"), float("inf")
    for box, size in [((nan, 2, 3, 4), (10, 10)), ((inf, 2, 3, 4), (10, 10)), ((1, 2, 3, 4), (inf, 10)),
                      ((1, 2, 3, 4), (nan, 10)), ((1, 2, 3, 4), ("10", 10))]:
        with pytest.raises(ValueError, match="must be"):
            denormalize_box(box, *size)
        with pytest.raises(ValueError, match="must be"):
            normalize_box(box, *size)  # inf was an OverflowError, an infinite width gave (0, 200, 0, 400)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        denormalize_box((1, 2, 3, 4), 10, 10, scale=nan)
    with pytest.raises(ValueError, match="got a str"):
        denormalize_box("1234", 10, 10)  # not the box (1, 2, 3, 4)


def test_draw_boxes_far_outside_the_image_and_multiline_labels() -> None:
    image = Image.new("RGB", (50, 40), "white")
    # a model's huge coordinates (finite after denormalize) made Pillow fail with a SystemError
    for box in [(1e300, 1e300, 2e300, 2e300), (-1e20, -1e20, 10, 10), (-float("inf"), 5, float("inf"), 30)]:
        assert draw_boxes(image, [("xy", box)]).size == (50, 40)
    assert draw_boxes(image, [("xy", (-1e20, 5, 1e20, 30))]).getbbox() == draw_boxes(image, [("xy", (-99, 5, 149, 30))]).getbbox()
    with pytest.raises(ValueError, match="not numbers"):
        draw_boxes(image, [("x", (float("nan"), 0, 10, 10))])
    objects = denormalize_objects(parse_grounding("<ref>a\nred\tcar</ref><box>(1,2),(300,400)</box>"), 50, 40)
    assert draw_boxes(image, objects).size == (50, 40)  # was "can't measure length of multiline text"


def test_draw_boxes_hands_pillow_only_coordinates_near_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow draws a wide outline's sides pixel by pixel over their whole length: a model's garbage box
    # <box>(0,0),(999999999,999999999)</box> (denormalized: ~4.5e8 pixels) took seconds per box in `chat --draw`
    from PIL import ImageDraw

    image = Image.new("RGB", (60, 40), "white")
    objects = denormalize_objects(parse_grounding("<ref>car</ref><box>(0,0),(999999999,999999999)</box>"), 60, 40)
    asked: list[tuple[float, ...]] = []
    rectangle = ImageDraw.ImageDraw.rectangle

    def spy(self: ImageDraw.ImageDraw, xy: tuple[float, ...], *args: object, **kwargs: object) -> None:
        if kwargs.get("outline") is not None:
            asked.append(tuple(xy))
        rectangle(self, xy, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "rectangle", spy)
    draw_boxes(image, objects, width=3)
    assert asked and all(-10 <= v <= 70 for v in asked[0])
    monkeypatch.undo()
    # and the pixels are those Pillow draws for the box as given
    for box in [(-30.0, -25.0, 90.0, 70.0), (-500.0, 10.0, 20.0, 500.0), (70.0, 50.0, 900.0, 900.0), (-90.0, -90.0, -20.0, 30.0)]:
        expected = image.copy()
        ImageDraw.Draw(expected).rectangle(box, outline="#1f77b4", width=3)
        assert draw_boxes(image, [(None, box)], width=3).tobytes() == expected.tobytes(), box


def test_normalize_box_of_finite_values_whose_quotient_overflows() -> None:
    # 1e308 pixels in a 0.5-pixel-wide image: x / W * 1000 is inf, int() of it was an OverflowError
    assert normalize_box((1e308, -1e308, 0.25, 10.0), 0.5, 20.0) == (999, 0, 500, 500)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"width": 0}, "width must be an integer from 1 to 1000, got 0"),
    ({"width": 10**9}, "width must be an integer from 1 to 1000"),  # Pillow drew it pixel by pixel: hours
    ({"width": 2.5}, "width must be an integer from 1 to 1000, got 2.5"),  # was a TypeError from Pillow
    ({"font_size": 100_000}, "font_size must be an integer from 1 to 1000"),  # was an OSError from FreeType
    ({"font_size": 0}, "font_size must be an integer from 1 to 1000"),
])
def test_draw_boxes_sizes_out_of_range_are_value_errors(kwargs, message) -> None:
    image = Image.new("RGB", (64, 48), "white")
    with pytest.raises(ValueError, match=message):
        grounding.draw_boxes(image, [("cat", (1, 2, 30, 40))], **kwargs)


def test_arguments_that_are_not_numbers_are_value_errors_naming_them() -> None:
    # were raw TypeErrors: "'>' not supported between instances of 'str' and 'int'", "float() argument must be ..."
    for scale in ("a", None, [999]):
        with pytest.raises(ValueError, match=re.escape(f"scale must be a positive number, got {scale!r}")):
            denormalize_box((1, 2, 3, 4), 10, 10, scale=scale)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="scale must be a positive number"):
            denormalize_objects([GroundedObject("a", [Box(1, 2, 3, 4)])], 10, 10, scale=scale)  # type: ignore[arg-type]
    for box in ((1, None, 3, 4), (1, [2], 3, 4), 5):
        for call in (lambda b: denormalize_box(b, 10, 10), lambda b: normalize_box(b, 10, 10), format_box,
                     lambda b: iou(b, (0, 0, 1, 1)), lambda b: draw_boxes(_white(), [("x", b)])):
            with pytest.raises(ValueError, match="a box is 4 numbers"):
                call(box)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16B", "F", "CMYK", "YCbCr",
                                  "LAB", "HSV", "RGBX", "RGBa"])
def test_draw_boxes_on_an_image_of_any_mode(mode: str) -> None:
    # "La" raised (Pillow cannot convert it to RGB), a palette with transparency warned, alpha was dropped
    image = Image.new(mode, (40, 30))
    out = draw_boxes(image, [("a", (5, 5, 30, 25))], colors=["#ff0000"], width=2)
    assert out.size == (40, 30) and out.getpixel((5, 15))[:3] == (255, 0, 0)
    assert out.mode == ("RGBA" if mode in ("LA", "La", "PA", "RGBa") else "RGB")


def test_draw_boxes_keeps_transparency_and_shows_sixteen_bit_images_as_loaded() -> None:
    clear = Image.new("LA", (40, 30), (90, 0))
    out = draw_boxes(clear, [(None, (5, 5, 30, 25))], colors=["#ff0000"], width=2)
    assert out.getpixel((15, 15)) == (90, 90, 90, 0) and out.getpixel((5, 15)) == (255, 0, 0, 255)
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.info["transparency"] = b"\xff\x00"  # index 1 is transparent (bytes: Pillow warned converting to RGB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = draw_boxes(palette, [(None, (5, 5, 30, 25))], width=2)
    assert out.mode == "RGBA" and out.getpixel((15, 15)) == (0, 200, 0, 0)
    # a 16-bit scan: PIL's convert("RGB") clips it almost white; drawn as load_image (what the model saw) shows it
    values = np.linspace(0, 65535, 40 * 30).astype(np.uint16).reshape(30, 40)
    scan = Image.fromarray(values)
    out = draw_boxes(scan, [], width=2)
    assert np.array_equal(np.asarray(out), np.asarray(load_image(scan)))
    assert np.asarray(out).mean() < 140


def test_a_long_label_no_font_draws_makes_a_short_warning(caplog: pytest.LogCaptureFixture) -> None:
    # the warning held every missing character and the whole label, each time: 5,000 of them made a 10 KB line
    from qwenvl.grounding import _label_runs

    with caplog.at_level(logging.WARNING, logger="qwenvl.grounding"):
        _label_runs("\u72d7" * 5000, 14, system_fonts=False)
    (record,) = caplog.records
    assert len(record.getMessage()) < 200
    assert "'\u72d7' of label '" in record.getMessage() and "... (5000 characters)" in record.getMessage()
