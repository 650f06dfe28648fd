"""Image loading and STEP3-VL preprocessing (MODEL.md, "Image preprocessing").

Pipeline per image: load → RGB → pad tiny extreme images → cap the long side → pick a crop window →
resize to the crop canvas and cut window×window crops row by row → every view to [0,1], CLIP-normalize,
then an antialiased bilinear resize of the *normalized* tensor to 728 (global) or 504 (crops).

The arithmetic follows the official processor literally, including its float rounding: the crop rule
compares `side/window - side//window > 0.2` in float64, so e.g. 550×250 (window 250, r = 2.2 whose float
fractional part is 0.2000000000000002) gets 3 columns where exact arithmetic would give 2.
"""

from __future__ import annotations

import base64
import io
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be used: empty, zero-sized, undecodable or of an unsupported type."""


@dataclass(frozen=True)
class ImageSpec:
    """Preprocessing geometry. Defaults are the official STEP3-VL values."""

    global_size: int = 728  # global view side fed to the encoder
    crop_size: int = 504  # crop side fed to the encoder
    max_side: int = 3024  # long side cap before windowing
    no_crop_max_side: int = 728  # long side up to which small images get no 504 crops
    pad_min_side: int = 32  # images thinner than this with extreme ratios get square-padded
    pad_ratio: float = 4.0
    # False: the global view only, never crops (a model trained at a small `image_size`, whose crops would cost
    # more than the picture is worth; config.json's vision_config.use_crops). STEP3-VL itself uses crops.
    crops: bool = True
    # The largest pixel buffer one image may need (the decoded picture, its square padding, the canvas its crops
    # are cut from), checked from the header before any buffer exists: a 141-byte 20000x1 PNG would otherwise be
    # padded to a 20000x20000 canvas (1.2 GB). 0: no limit. 64 Mpx = 192 MB of RGB, above any camera's 48 Mpx.
    max_pixels: int = 64_000_000
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class CropPlan:
    """Pure geometry of one image's preprocessing (no pixels), see `plan_image`."""

    padded: tuple[int, int]  # (w, h) after step 1 (square padding, or unchanged)
    scaled: tuple[int, int]  # (w, h) after step 2: the global view before its 728 resize
    window: int  # crop window side; 0 means no crops
    canvas: tuple[int, int]  # (w, h) the image is resized to before cutting crops
    grid: tuple[int, int]  # (rows, cols) of crops; (0, 0) without crops
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=())  # (x0, y0, x1, y1), row-major

    @property
    def num_crops(self) -> int:
        return len(self.boxes)


@dataclass
class ImageViews:
    """The encoder inputs of one image.

    The model's image features for this image are, in order: the crops' (row by row, left to right),
    then the global view's; that is the order of `<im_patch>` runs in the token layout.
    """

    global_view: torch.Tensor  # [3, global_size, global_size] float32, normalized
    crops: torch.Tensor  # [n, 3, crop_size, crop_size] float32, normalized; n may be 0
    grid: tuple[int, int]  # (rows, cols) of crops; (0, 0) without crops
    size: tuple[int, int]  # (w, h) of the loaded input image

    @property
    def num_crops(self) -> int:
        return self.crops.shape[0]


# ---------------------------------------------------------------------------------------------
# Loading


def load_image(source: object, max_pixels: int = 0) -> Image.Image:
    """Any supported image source → an RGB PIL image.

    Accepts a PIL image, a path (str / os.PathLike; a str may also be a `file://` URL or a `data:` URL
    with base64 payload), encoded bytes (bytearray / memoryview too) or a numpy array (HxW, HxWx1/3/4;
    uint8, uint16, bool, float in [0, 1], or other integer dtypes with values in [0, 255]).
    Alpha is dropped, not composited (PIL's `convert("RGB")` semantics); 16-bit and float images are
    rescaled to 8 bits (see `_to_rgb`). No EXIF orientation is applied: pixels are used as decoded.
    max_pixels: refuse, from the header and before decoding, an encoded image with more pixels (0: no limit).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "bytes", max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, str):
        return _load_str(source, max_pixels)
    if isinstance(source, os.PathLike):
        return _load_path(Path(source), max_pixels)
    raise ImageError(
        f"unsupported image type {type(source).__name__}: expected a PIL image, a path, bytes or a numpy array"
    )


def _load_str(s: str, max_pixels: int = 0) -> Image.Image:
    if not s:
        raise ImageError("empty image path")
    if s.startswith("data:"):
        return _decode(_data_url_bytes(s), "data: URL", max_pixels)
    if s.startswith("file://"):
        return _load_path(Path(urllib.parse.unquote(urllib.parse.urlparse(s).path)), max_pixels)
    if s.startswith(("http://", "https://")):
        raise ImageError(f"remote image URLs are not fetched (no network access): {s[:200]}")
    return _load_path(Path(s), max_pixels)


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("data: URL must look like data:<mime>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as e:
        raise ImageError(f"data: URL has an invalid base64 payload: {e}") from None


def _load_path(path: Path, max_pixels: int = 0) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    return _decode(path.read_bytes(), str(path), max_pixels)


def _decode(data: bytes, what: str, max_pixels: int = 0) -> Image.Image:
    if not data:
        raise ImageError(f"empty image data ({what})")
    try:
        img = Image.open(io.BytesIO(data))
        _check_pixels(img.size, img.size, max_pixels, what)  # the header's size, before any pixel is decoded
        img.load()  # force the full decode so truncated files fail here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image ({what}, {len(data)} bytes): {e}") from None
    return _to_rgb(img, what)


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"numpy image must be HxW or HxWxC with C in (1, 3, 4), got shape {a.shape}")
    if a.size == 0:
        raise ImageError(f"zero-sized numpy image, shape {a.shape}")
    a8 = _array_to_uint8(a)
    img = Image.fromarray(np.ascontiguousarray(a8))
    return _to_rgb(img, "numpy array")


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return _u16_to_u8(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError("float numpy image contains NaN or inf")
        return np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                f"integer numpy image of dtype {a.dtype} must hold values in [0, 255], got [{lo}, {hi}]"
            )
        return a.astype(np.uint8)
    raise ImageError(f"unsupported numpy image dtype {a.dtype}")


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    # 65535 / 255 = 257 exactly, so full scale maps to full scale.
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"zero-sized image {w}x{h} ({what})")
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # PIL's own I;16/I → RGB conversion clips at 255 (most 16-bit images turn white): rescale the
        # 16-bit range instead. Mode "I" is treated as 16-bit too (how PIL opens 16-bit PNGs).
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535).astype(np.uint16)
        return Image.fromarray(_u16_to_u8(a)).convert("RGB")
    if img.mode == "F":
        # Float images are taken to be in [0, 1], like float numpy arrays.
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image of mode {img.mode} to RGB ({what}): {e}") from None


# ---------------------------------------------------------------------------------------------
# Geometry


def plan_image(width: int, height: int, spec: ImageSpec = ImageSpec(), what: str = "image") -> CropPlan:
    """The preprocessing geometry of a width×height image (MODEL.md steps 1-4), without pixels; refuses one whose
    buffers would exceed spec.max_pixels (what: the image's name, for the error)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"zero-sized image {width}x{height}")
    w, h = _padded_size(width, height, spec)
    _check_pixels((width, height), (w, h), spec.max_pixels, what)
    sw, sh = _scaled_size(w, h, spec)
    window = _window(max(sw, sh), min(sw, sh), spec)
    if window == 0:
        return CropPlan((w, h), (sw, sh), 0, (sw, sh), (0, 0), ())
    cw, ch = _crop_side(sw, window), _crop_side(sh, window)
    _check_pixels((width, height), (cw, ch), spec.max_pixels, what)
    xs, ys = _starts(cw, window), _starts(ch, window)
    boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
    return CropPlan((w, h), (sw, sh), window, (cw, ch), (len(ys), len(xs)), boxes)


def _check_pixels(size: tuple[int, int], buffer: tuple[int, int], limit: int, what: str) -> None:
    if limit and buffer[0] * buffer[1] > limit:
        need = "" if buffer == size else f" needs a {buffer[0]}x{buffer[1]} buffer, which"
        raise ImageError(f"{what}: a {size[0]}x{size[1]} image{need} exceeds the limit of {limit:,} pixels "
                         f"(max_image_pixels)")


def _padded_size(w: int, h: int, spec: ImageSpec) -> tuple[int, int]:
    ratio = w / h
    if min(w, h) < spec.pad_min_side and (ratio > spec.pad_ratio or ratio < 1 / spec.pad_ratio):
        return max(w, h), max(w, h)
    return w, h


def _scaled_size(w: int, h: int, spec: ImageSpec) -> tuple[int, int]:
    long = max(w, h)
    if long <= spec.max_side:
        return w, h
    scale = spec.max_side / long
    return int(w * scale), int(h * scale)


def _window(long: int, short: int, spec: ImageSpec) -> int:
    # MODEL.md step 3 read literally: small images (long ≤ 728) get crops only when elongated (> 1.5),
    # with the short side as window; larger ones get 504 windows, shrunk to the short side only for
    # very elongated images (> 4). Checks: 1280×720 → 504 → 3×2 crops → 670 tokens; 728×728 → none.
    if not spec.crops:
        return 0
    if long <= spec.no_crop_max_side:
        return short if long / short > 1.5 else 0
    return min(short, spec.crop_size) if long / short > spec.pad_ratio else spec.crop_size


def _crop_side(side: int, window: int) -> int:
    r = side / window
    if r < 1:
        return side  # shorter than the window: kept, its single crop overhangs (zero-filled)
    n = int(r)
    return window * (n + 1 if r - side // window > 0.2 else n)


def _starts(side: int, window: int) -> list[int]:
    n = 1 if side <= window else math.ceil((side - window) / window + 1)
    starts = [i * window for i in range(n)]
    if n > 1 and starts[-1] + window > side:
        starts[-1] = side - window  # shift the last crop inward instead of overhanging
    return starts


# ---------------------------------------------------------------------------------------------
# Pixels


def preprocess_image(image: object, spec: ImageSpec = ImageSpec()) -> ImageViews:
    """Any `load_image` source → the normalized global view and crops (MODEL.md steps 1-5)."""
    img = load_image(image, spec.max_pixels)
    plan = plan_image(*img.size, spec=spec, what=_describe(image))
    if plan.padded != img.size:
        canvas = Image.new("RGB", plan.padded, 0)
        canvas.paste(img, (0, 0))  # image at the top-left, zeros elsewhere
        padded = canvas
    else:
        padded = img
    scaled = _pil_resize(padded, plan.scaled)
    global_view = _resize(_normalize(_to_tensor(scaled), spec), spec.global_size)[0]
    if plan.window == 0:
        crops = torch.empty(0, 3, spec.crop_size, spec.crop_size)
    else:
        src = _pil_resize(scaled, plan.canvas)
        # PIL's crop zero-fills any part of a box outside the image (a side shorter than the window).
        views = torch.stack([_to_tensor(src.crop(box)) for box in plan.boxes])
        crops = _resize(_normalize(views, spec), spec.crop_size)
    return ImageViews(global_view=global_view, crops=crops, grid=plan.grid, size=img.size)


def _describe(source: object) -> str:
    path = _file_path(source)
    if path is not None:
        return str(path)
    return "data: URL" if isinstance(source, str) else type(source).__name__


def _file_path(source: object) -> Path | None:
    """The local file a source names (a path, or a str path / file:// URL); None for in-memory sources."""
    if isinstance(source, os.PathLike):
        return Path(source)
    if isinstance(source, str) and source and not source.startswith(("data:", "http://", "https://")):
        if source.startswith("file://"):
            return Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
        return Path(source)
    return None


def image_size(source: object, max_pixels: int = 0) -> tuple[int, int]:
    """(w, h) of an image source as `load_image` would load it; a file is only opened (its header read), not
    decoded."""
    path = _file_path(source)
    if path is None or not path.is_file():
        return load_image(source, max_pixels).size  # in memory already, or load_image's error for a bad path
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image ({path}): {e}") from None
    if w == 0 or h == 0:
        raise ImageError(f"zero-sized image {w}x{h} ({path})")
    return w, h


class LazyImageViews:
    """An image's encoder views made only when read (`global_view` / `crops`) and kept until `release()`: a
    training set of image files holds paths and sizes in memory, not pixels. The token layout (`grid`) is known
    up front from the file's header."""

    def __init__(self, source: object, spec: ImageSpec = ImageSpec()):
        self.source, self.spec = source, spec
        self.size = image_size(source, spec.max_pixels)
        self.grid = plan_image(*self.size, spec=spec, what=_describe(source)).grid
        self._views: ImageViews | None = None

    def _load(self) -> ImageViews:
        if self._views is None:
            views = preprocess_image(self.source, self.spec)
            if views.size != self.size:
                raise ImageError(f"image {self.source!r:.200} changed size since it was planned: {self.size} -> "
                                 f"{views.size}")
            self._views = views
        return self._views

    @property
    def global_view(self) -> torch.Tensor:
        return self._load().global_view

    @property
    def crops(self) -> torch.Tensor:
        return self._load().crops

    @property
    def num_crops(self) -> int:
        return plan_image(*self.size, spec=self.spec).num_crops

    def release(self) -> None:
        self._views = None


def _pil_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3]
    return a.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def _normalize(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[3,H,W] or [N,3,H,W] → [N,3,size,size], non-proportional, antialiased bilinear."""
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
