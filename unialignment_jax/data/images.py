"""Image decoding, resizing and encoding shared by `prepare` and the Grain pipeline (no jax).

Resizing follows the official transform (dataset/data_unify.py): torchvision `Resize(R, BICUBIC)`
(the short side becomes R, the long side int(R * long / short)) then `CenterCrop(R)` (offsets
int(round((size - R) / 2))), then `ToTensor` + `Normalize(.5, .5)`, i.e. pixels / 127.5 - 1.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard: width * height above this is rejected


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the summary category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes into an RGB PIL image, checking the size before decoding pixels."""
    if not data:
        raise ImageError("corrupt image", "empty file")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if max_pixels and w * h > max_pixels:
            raise ImageError("image too large", f"{w}x{h} = {w * h} pixels > {max_pixels}")
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image too large", str(e)) from None
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, ...)
        detail = str(e).replace(" <_io.BytesIO object", "").split(" at 0x")[0]
        raise ImageError("corrupt image", f"{type(e).__name__}: {detail}") from None
    if img.width < 1 or img.height < 1:
        raise ImageError("corrupt image", f"size {img.size}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Bicubic short-side resize to `resolution`, then a centre crop to resolution x resolution."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    if w <= h:
        nw, nh = resolution, int(resolution * h / w)
    else:
        nw, nh = int(resolution * w / h), resolution
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top = int(round((nh - resolution) / 2.0))
    left = int(round((nw - resolution) / 2.0))
    return img.crop((left, top, left + resolution, top + resolution))


def encode_image(img: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format {fmt!r}: use png or jpeg")
    return buf.getvalue()


def write_png(path, pixels) -> None:
    """uint8 (H, W, 3) pixels as a PNG file (PIL's default compression) at `path`, local or a URI
    (gs://...): encoded in memory, then written whole through etils epath (PIL cannot open a URI)."""
    from etils import epath

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buf, format="PNG")
    epath.Path(path).write_bytes(buf.getvalue())


def source_format(data: bytes) -> str | None:
    """'jpeg' / 'png' for bytes in those formats, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def to_pixels(x, resolution: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes or a uint8 (H, W, 3) array -> uint8 (R, R, 3), resized/cropped if needed."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
            raise ImageError("corrupt image", f"array of shape {x.shape} and dtype {x.dtype}")
        if resolution is None or x.shape[:2] == (resolution, resolution):
            return x
        img = Image.fromarray(x)
    else:
        img = open_image(bytes(x), max_pixels)
    if resolution is not None:
        img = resize_center_crop(img, resolution)
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (ToTensor then Normalize(.5, .5))."""
    out = np.multiply(pixels, np.float32(1.0 / 127.5), dtype=np.float32)
    out -= np.float32(1.0)
    return out


__all__ = ["ImageError", "open_image", "resize_center_crop", "encode_image", "write_png", "source_format",
           "to_pixels", "normalize", "DEFAULT_MAX_PIXELS"]
