"""Turning request bytes into RGB images safely: sniffed formats, pixel limits checked before decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from fpet.imaging import draft, to_rgb
from service.errors import ServiceError

ALLOWED = {"jpeg", "png", "webp"}
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png", "image/webp": "webp"}


def sniff(data: bytes) -> str | None:
    """The image format from its magic bytes (never from the client's word)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    return None


def decode_image(data: bytes, max_pixels: int, size: int | None = None, pixels_left: int | None = None) -> Image.Image:
    """RGB pixels of a request's image; with `size`, a JPEG decodes straight to (at least) that scale, as training's
    loader does through `fpet.imaging.resize_rgb`. `pixels_left`: what the request may still decode, checked at the
    size the image will decode to, before any pixel is."""
    if not data:
        raise ServiceError(400, "invalid_image", "the image is empty (0 bytes)")
    kind = sniff(data)
    if kind is None:
        raise ServiceError(400, "invalid_image", "the body is not a JPEG, PNG or WebP image")
    if kind not in ALLOWED:
        raise ServiceError(
            415, "unsupported_media_type", f"{kind.upper()} images are not accepted: send JPEG, PNG or WebP"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ServiceError(
                    413, "payload_too_large", f"the image is {width}x{height} pixels, over the limit of {max_pixels}"
                )
            if size is not None:
                draft(image, size)
            if pixels_left is not None and image.width * image.height > pixels_left:
                raise ServiceError(
                    413,
                    "payload_too_large",
                    "the request's images decode to more pixels than one "
                    "request may (FPET_MAX_REQUEST_PIXELS); send fewer or smaller images",
                )
            image.load()
            return to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ServiceError(413, "payload_too_large", "the image declares too many pixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ServiceError(
                400, "invalid_image", f"the {kind.upper()} image is corrupt or truncated: {exc}"
            ) from None
