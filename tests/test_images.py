"""Image loading (every source kind, every failure named) and the official transform (golden pixels)."""

from __future__ import annotations

import base64
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from qwenvl.config import CLIP_MEAN, CLIP_STD
from qwenvl.images import ImageError, MediaPolicy, load_image, open_image, pixel_values, preprocess

FIXTURE = Path(__file__).parent / "fixtures" / "qwenvl-tiny"
IMAGES = ["images/cat.png", "images/street.jpg"]


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")


def test_golden_pixels() -> None:
    with safe_open(str(FIXTURE / "expected.safetensors"), framework="pt") as f:
        expected = f.get_tensor("pixels")
    got = pixel_values(IMAGES, 448, base_dir=FIXTURE)
    assert got.shape == expected.shape == (2, 3, 448, 448) and got.dtype == torch.float32
    # torch.testing.assert_close costs seconds on first use; a max-abs check says the same here
    assert (got - expected).abs().max().item() < 1e-5  # the brief allows 1e-4; we get 0 (same PIL path)


def test_preprocess_is_bicubic_then_clip_normalization(sample: Image.Image) -> None:
    for size in (448, 224, 28):
        x = preprocess(sample, size)
        ref = np.asarray(sample.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert (x - torch.from_numpy(ref).permute(2, 0, 1)).abs().max().item() < 1e-6
    # a pure white image lands at (1 - mean) / std in each channel
    white = preprocess(Image.new("RGB", (10, 20), (255, 255, 255)), 28)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert (white[:, 5, 5] - expected).abs().max().item() < 1e-6


def test_sources_agree(sample: Image.Image, tmp_path: Path) -> None:
    data = png_bytes(sample)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    ref = np.asarray(sample)
    for src, base in [
        (tmp_path / "sub" / "s.png", None),
        (str(tmp_path / "sub" / "s.png"), "/ignored/for/absolute/paths"),
        ("sub/s.png", tmp_path),
        (Path("s.png"), tmp_path / "sub"),
        (data, None),
        (bytearray(data), None),
        (url, None),
        (sample, None),
    ]:
        img = load_image(src, base)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), ref), src if not isinstance(src, bytes) else "bytes"


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "1", "I", "F"])
def test_modes_convert_like_pil(sample: Image.Image, mode: str) -> None:
    # 8-bit content in every mode converts exactly as the official convert("RGB") (16-bit: the next test)
    img = sample.convert(mode)
    got = load_image(img)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(img.convert("RGB")))


def test_premultiplied_gray_with_alpha_converts_through_la(sample: Image.Image) -> None:
    # mode La: "conversion from La to L not supported", a ValueError naming no image
    img = sample.convert("LA").convert("La")
    got = load_image(img)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(img.convert("LA").convert("RGB")))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grayscale_png_scales_to_eight_bits(tmp_path: Path, mode: str) -> None:
    # PIL's convert("RGB") clips 16-bit values at 255: a 16-bit scan comes out almost white
    values = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    expected = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
    src = Image.fromarray(values)  # I;16
    if mode == "I;16":
        src.save(tmp_path / "g.png")
        img = load_image(tmp_path / "g.png")
    elif mode == "I;16B":  # big-endian 16-bit (TIFF, some PNG readers); given in memory
        img = load_image(Image.frombytes("I;16B", (64, 32), values.astype(">u2").tobytes()))
    else:  # how older Pillow opens a 16-bit PNG: mode I, format PNG
        src.save(tmp_path / "g.png")
        opened = Image.open(tmp_path / "g.png")
        opened.load()
        as_i = opened.convert("I")
        as_i.format = "PNG"
        img = load_image(as_i)
    got = np.asarray(img)
    assert img.mode == "RGB" and np.array_equal(got[..., 0], expected)
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    assert got.mean() < 140  # PIL's own conversion: nearly all 255


def test_rgba_file_drops_alpha(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    (tmp_path / "a.png").write_bytes(png_bytes(rgba))
    assert load_image(tmp_path / "a.png").getpixel((1, 1)) == (200, 100, 50)


def test_errors_name_the_problem(sample: Image.Image, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "random.jpg").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "notes.png").write_text("this is a text file, not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(png_bytes(sample)[:300])
    (tmp_path / "folder.png").mkdir()
    cases = [
        ("missing.png", f"image not found: {tmp_path / 'missing.png'}"),
        ("random.jpg", f"cannot decode image {tmp_path / 'random.jpg'}: not a PNG/JPEG"),
        ("notes.png", f"cannot decode image {tmp_path / 'notes.png'}: not a PNG/JPEG"),
        ("empty.jpg", f"image file {tmp_path / 'empty.jpg'} is empty (zero size)"),
        ("truncated.png", f"cannot decode image {tmp_path / 'truncated.png'}"),
        ("folder.png", "image path is not a file"),
        ("http://example.com/a.jpg", "image URLs are not downloaded: 'http://example.com/a.jpg'"),
        ("HTTPS://example.com/a.jpg", "image URLs are not downloaded"),
        # was "image not found: <tmp>/file:/etc/hostname", as if the URL were a relative path
        ("file:///etc/hostname", "file: URLs are not read: 'file:///etc/hostname'. Pass the path itself"),
        ("FILE:" + str(tmp_path / "random.jpg"), "file: URLs are not read"),
        ("data:image/png;base64,@@@", "data URL has invalid base64"),
        ("data:image/png,rawpixels", "not base64-encoded"),
        ("data:image/png;base64,", "data URL holds no data"),
        ("", "empty image path"),
    ]
    for src, message in cases:
        with pytest.raises(ImageError) as info:
            load_image(src, tmp_path)
        assert message in str(info.value), (src, str(info.value))
        assert isinstance(info.value, ValueError)
    with pytest.raises(ImageError, match="image bytes are empty"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"cannot decode image <5 bytes>: not a PNG/JPEG"):
        load_image(b"hello")
    with pytest.raises(ImageError, match=r"has zero size \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(123)  # type: ignore[arg-type]


def _corrupt(fmt: str) -> bytes:
    """A small file of ``fmt`` with one header field set to a value PIL's plugin fails on with no OSError."""
    buf = io.BytesIO()
    Image.new("F" if fmt == "SPIDER" else "RGB", (4, 4)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    if fmt == "DDS":
        struct.pack_into("<I", data, 80, 0x40000000)  # pixel format flags: NotImplementedError in PIL
    else:
        struct.pack_into("<f", data, 26 * 4, float("inf"))  # a header float PIL int()s: OverflowError
    return bytes(data)


@pytest.mark.parametrize("fmt", ["DDS", "SPIDER"])
def test_corrupt_files_of_any_format_are_image_errors(tmp_path: Path, fmt: str) -> None:
    # PIL's plugins fail on some corrupt headers with errors that are not OSError/ValueError: they escaped as
    # raw NotImplementedError/OverflowError (a traceback in the CLI, a 500 in the server)
    data = _corrupt(fmt)
    (tmp_path / "bad.img").write_bytes(data)
    for src in (data, tmp_path / "bad.img", "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(ImageError, match="cannot decode image"):
            load_image(src)


def test_a_path_the_system_cannot_look_up_is_an_image_error(tmp_path: Path) -> None:
    # a name longer than the filesystem allows was a raw OSError (File name too long) from the existence check
    for policy in (None, MediaPolicy(tmp_path)):
        with pytest.raises(ImageError, match="cannot read image .*File name too long"):
            load_image("a" * 5000 + ".png", tmp_path, policy=policy)


def test_postscript_never_reaches_ghostscript(tmp_path: Path, fake_ghostscript: Path) -> None:
    # PIL decodes EPS by running Ghostscript on the bytes: an image named by a prompt, a data file or an HTTP
    # request must never make us run a program
    text_eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    binary_eps = b"\xc5\xd0\xd3\xc6" + b"\0" * 26
    (tmp_path / "a.png").write_bytes(text_eps)  # the name does not matter
    sources = [text_eps, binary_eps, tmp_path / "a.png", "data:image/png;base64," + base64.b64encode(text_eps).decode()]
    for src in sources:
        with pytest.raises(ImageError, match="PostScript/EPS, which is not read"):
            load_image(src)
    with pytest.raises(ImageError, match=r"a\.png is PostScript/EPS"):
        open_image(tmp_path / "a.png")  # the header check of predict and eval
    assert not fake_ghostscript.exists()


def test_decompression_bomb_guard(sample: Image.Image) -> None:
    data = png_bytes(sample)  # 53x37 = 1961 pixels
    with pytest.raises(ImageError, match=r"53x37 = 1961 pixels, more than the limit of 1000"):
        load_image(data, max_pixels=1000)
    assert load_image(data, max_pixels=1961).size == (53, 37)


def test_pixel_values_empty_and_mixed(sample: Image.Image) -> None:
    assert pixel_values([], 448).shape == (0, 3, 448, 448)
    px = pixel_values([sample, png_bytes(sample)], 56)
    assert px.shape == (2, 3, 56, 56) and torch.equal(px[0], px[1])


def test_a_link_that_loops_is_said_to_loop(tmp_path: Path) -> None:
    # a link to itself, or two links to each other, was "image not found" though `ls` lists them
    (tmp_path / "self.png").symlink_to("self.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "dir").symlink_to("dir")
    for name in ("self.png", "a.png", "dir/cat.png"):
        for policy in (None, MediaPolicy(tmp_path)):  # the user's own paths, and the ones a media folder allows
            with pytest.raises(ImageError, match=r"^image path '.*' cannot be resolved: a link in it loops") as caught:
                load_image(name, tmp_path, policy=policy)
            assert "\n" not in str(caught.value)
    (tmp_path / "dangling.png").symlink_to("nothing.png")
    with pytest.raises(ImageError, match="^image not found: "):  # a link to nothing is still not found
        load_image("dangling.png", tmp_path)


def test_check_image_reads_only_the_header_when_asked(tmp_path):
    # the check before predict loads the weights: every refusal of load_image, with its words, without decoding
    from qwenvl.images import check_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:-40])  # the header is whole, the pixel data cut short
    assert check_image("cut.png", tmp_path, decode=False) == (64, 48)
    with pytest.raises(ImageError, match="truncated or corrupt file"):
        check_image("cut.png", tmp_path)
    (tmp_path / "folder.png").mkdir()
    for src, decode in (("folder.png", False), ("folder.png", True), ("file:cut.png", False)):
        with pytest.raises(ImageError) as header_only:
            check_image(src, tmp_path, decode=decode)
        with pytest.raises(ImageError) as loaded:
            load_image(src, tmp_path)
        assert str(header_only.value) == str(loaded.value)


def test_check_image_names_a_file_as_the_caller_spells_it(tmp_path, monkeypatch):
    # data-convert --check_images named the file as typed (image_location/NAME) by replacing the absolute path in
    # the message; check_image(name=...) and image_problems(name_as_given=True) say it so in the first place
    from qwenvl.images import check_image, image_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    (tmp_path / "imgs" / "cut.png").write_bytes(buf.getvalue()[:-40])
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "folder.png").mkdir()
    (tmp_path / "imgs" / "loop.png").symlink_to("loop.png")
    files = [Path("imgs", n) for n in ("cut.png", "empty.png", "folder.png", "gone.png")]
    given = image_problems(files, name_as_given=True)
    resolved = image_problems(files)
    for file in files:
        assert str(file) in given[file] and str(tmp_path) not in given[file], given[file]
        # the default names the file it resolves to; else the words are the same
        assert resolved[file] == given[file].replace(str(file), str(tmp_path / file)), resolved[file]
    for file in [*files, Path("imgs", "loop.png")]:
        with pytest.raises(ImageError) as e:
            check_image(str(tmp_path / file), name="the file")
        assert "the file" in str(e.value) and str(tmp_path) not in str(e.value), str(e.value)
    assert given[files[0]].startswith("cannot decode image imgs/cut.png: ")
    assert given[files[-1]] == "image not found: imgs/gone.png"
