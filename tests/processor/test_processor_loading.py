"""Every accepted image source and every rejected one."""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step3vl.processor import ImageError, load_image, preprocess_image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def px(img: Image.Image, xy=(0, 0)):
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ---- PIL modes ---------------------------------------------------------------------------------


def test_rgba_drops_alpha():
    assert px(load_image(Image.new("RGBA", (4, 3), (10, 20, 30, 0)))) == (10, 20, 30)


def test_la_and_l_and_1():
    assert px(load_image(Image.new("LA", (4, 3), (77, 0)))) == (77, 77, 77)
    assert px(load_image(Image.new("L", (4, 3), 77))) == (77, 77, 77)
    assert px(load_image(Image.new("1", (4, 3), 1))) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (4, 3), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    assert px(load_image(p)) == (12, 34, 56)
    p.info["transparency"] = 1
    assert px(load_image(p)) == (12, 34, 56)


def test_cmyk():
    assert px(load_image(Image.new("CMYK", (4, 3), (0, 0, 0, 0)))) == (255, 255, 255)
    assert px(load_image(Image.new("CMYK", (4, 3), (255, 0, 0, 0)))) == (0, 255, 255)


def test_sixteen_bit_and_int_and_float_rescaled():
    # 16-bit full scale maps to 8-bit full scale (PIL's own convert would clip everything ≥ 255 to white).
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(a)
    assert img16.mode == "I;16"
    out = load_image(img16)
    assert [px(out, (i, 0))[0] for i in range(3)] == [0, 100, 255]
    out = load_image(Image.fromarray(a.astype(np.int32)))  # mode "I"
    assert [px(out, (i, 0))[0] for i in range(3)] == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F"
    out = load_image(f)
    assert [px(out, (i, 0)) for i in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((5, 6), 257 * 40, dtype=np.uint16)).save(path)
    assert px(load_image(path)) == (40, 40, 40)


# ---- paths, bytes, URLs --------------------------------------------------------------------------


@pytest.fixture()
def png_file(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path)
    return path


def test_path_str_pathlike_file_url(png_file):
    for src in (png_file, str(png_file), png_file.as_uri()):
        img = load_image(src)
        assert img.size == (7, 5) and px(img) == (1, 2, 3)


def test_bytes_like_and_data_url():
    data = png_bytes(Image.new("RGB", (7, 5), (4, 5, 6)))
    for src in (data, bytearray(data), memoryview(data)):
        assert px(load_image(src)) == (4, 5, 6)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert px(load_image(url)) == (4, 5, 6)


def test_jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG", quality=95)
    r, g, b = px(load_image(buf.getvalue()))
    assert abs(r - 200) < 6 and g < 16 and b < 16


# ---- numpy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr,expect",
    [
        (np.full((3, 4), 9, np.uint8), (9, 9, 9)),
        (np.full((3, 4, 1), 9, np.uint8), (9, 9, 9)),
        (np.tile(np.array([1, 2, 3], np.uint8), (3, 4, 1)), (1, 2, 3)),
        (np.tile(np.array([1, 2, 3, 0], np.uint8), (3, 4, 1)), (1, 2, 3)),
        (np.full((3, 4), 257 * 9, np.uint16), (9, 9, 9)),
        (np.full((3, 4, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((3, 4, 3), 2.0, np.float64), (255, 255, 255)),  # floats are clipped to [0, 1]
        (np.ones((3, 4), bool), (255, 255, 255)),
        (np.full((3, 4, 3), 200, np.int64), (200, 200, 200)),
    ],
)
def test_numpy_inputs(arr, expect):
    img = load_image(arr)
    assert img.size == (4, 3)
    assert px(img) == expect


def test_numpy_orientation():
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 2] = (255, 0, 0)  # row 0, column 2
    assert px(load_image(a), (2, 0)) == (255, 0, 0)


# ---- rejections ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,match",
    [
        (b"", "empty image data"),
        (bytearray(), "empty image data"),
        (b"definitely not an image", "cannot decode image"),
        (np.zeros((0, 10), np.uint8), "zero-sized"),
        (np.zeros((10, 0, 3), np.uint8), "zero-sized"),
        (np.zeros((3, 8, 5), np.uint8), r"shape \(3, 8, 5\)"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
        (np.full((2, 2), 300, np.int32), r"\[300, 300\]"),
        (np.zeros((2, 2), np.complex64), "dtype complex64"),
        (Image.new("RGB", (0, 5)), "zero-sized image 0x5"),
        (12, "unsupported image type int"),
        (None, "unsupported image type NoneType"),
        ([1, 2, 3], "unsupported image type list"),
        ("", "empty image path"),
        ("https://example.com/cat.png", "not fetched"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png,abc", "data: URL"),
        ("data:image/png;base64,", "empty image data"),
    ],
)
def test_rejections(src, match):
    with pytest.raises(ImageError, match=match):
        load_image(src)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(str(path))
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(path.as_uri())


def test_directory_and_bad_files_name_path(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty image data.*empty.png"):
        load_image(empty)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ImageError, match="cannot decode.*garbage.jpg"):
        load_image(garbage)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(png_bytes(Image.effect_noise((64, 64), 50))[:200])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(truncated)


def test_image_error_is_value_error_and_preprocess_rejects():
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ValueError, match="empty image data"):
        preprocess_image(b"")
