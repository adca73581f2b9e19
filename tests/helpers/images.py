"""Images the tests make themselves: encoded in any format, a PNG that declares a huge size, photos with structure."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge size: only the header and an empty data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg(colour=(200, 30, 30), size=(64, 48)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG")


def photo(seed: int) -> bytes:
    """A small PNG with structure, different for every seed."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


IMAGES = [photo(i) for i in range(8)]
