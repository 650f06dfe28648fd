"""Memory per image is bounded before any pixel buffer exists: hostile geometry (a tiny PNG that is 20000x1 and would
be square-padded to 20000x20000, a header claiming a huge picture) is refused from the header, at once, naming the
image and the limit; ordinary pictures are unaffected."""

from __future__ import annotations

import base64
import io
import resource
import time

import pytest
from PIL import Image

from step3vl.processor.image import ImageError, ImageSpec, image_size, plan_image, preprocess_image


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("w,h", [(20000, 1), (60000, 2)])
def test_elongated_bombs_are_refused_before_their_canvas_exists(w, h, tmp_path):
    data = _png(w, h)
    assert len(data) < 600  # a few hundred bytes on the wire
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    (tmp_path / "thin.png").write_bytes(data)
    before, t0 = _rss_mb(), time.perf_counter()
    with pytest.raises(ImageError, match=rf"data: URL: a {w}x{h} image needs a {w}x{w} buffer.*64,000,000 pixels"):
        preprocess_image(url)
    with pytest.raises(ImageError, match=rf"thin\.png: a {w}x{h} image.*max_image_pixels"):
        preprocess_image(tmp_path / "thin.png")
    assert time.perf_counter() - t0 < 1.0 and _rss_mb() - before < 100


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(3000, 3000))  # 9 Mpx: fine by default, refused under a 4 Mpx limit
    spec = ImageSpec(max_pixels=4_000_000)
    with pytest.raises(ImageError, match=r"big\.png: a 3000x3000 image exceeds the limit of 4,000,000 pixels"):
        preprocess_image(path, spec)
    assert preprocess_image(path).size == (3000, 3000)
    with pytest.raises(ImageError, match="exceeds the limit"):
        image_size("data:image/png;base64," + base64.b64encode(_png(3000, 3000)).decode(), 4_000_000)


def test_ordinary_pictures_and_the_official_geometry_are_unaffected():
    assert plan_image(1280, 720).grid == (2, 3)
    assert plan_image(40, 8).padded == (40, 40)  # thin and small: padded, as the official preprocessing does
    assert plan_image(8000, 6000).scaled == (3024, 2268)  # a 48 Mpx photo passes the default limit
    assert preprocess_image(Image.new("RGB", (300, 200))).global_view.shape[-1] == 728


def test_the_limit_can_be_raised_or_switched_off():
    assert plan_image(20000, 1, ImageSpec(max_pixels=0)).padded == (20000, 20000)
    with pytest.raises(ImageError):
        plan_image(20000, 1)
