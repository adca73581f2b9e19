import numpy as np
import pytest
from PIL import Image

from service.decode import decode_image, sniff
from service.errors import ServiceError
from tests.helpers.images import encode, png_bomb

LIMIT = 10_000_000


def error_of(data: bytes) -> ServiceError:
    with pytest.raises(ServiceError) as error:
        decode_image(data, LIMIT)
    return error.value


def test_formats_are_sniffed_from_bytes():
    rgb = Image.new("RGB", (8, 8), (10, 20, 30))
    assert sniff(encode(rgb, "JPEG")) == "jpeg" and sniff(encode(rgb, "PNG")) == "png"
    assert sniff(encode(rgb, "WEBP")) == "webp" and sniff(encode(rgb, "GIF")) == "gif"
    assert sniff(encode(rgb, "TIFF")) == "tiff" and sniff(b"hello") is None


def test_bad_bytes_get_their_status():
    jpeg = encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    assert (error_of(b"").status, error_of(b"").error_type) == (400, "invalid_image")
    assert error_of(jpeg[: len(jpeg) // 2]).status == 400  # truncated JPEG
    assert error_of(b"%PDF-1.4 definitely not an image").status == 400
    assert error_of(encode(Image.new("RGB", (4, 4)), "GIF")).status == 415
    assert error_of(encode(Image.new("RGB", (4, 4)), "TIFF")).status == 415
    bomb = png_bomb(100_000, 100_000)
    assert len(bomb) < 100
    assert (error_of(bomb).status, error_of(bomb).error_type) == (413, "payload_too_large")


def test_grey_rgba_16bit_become_rgb():
    for image in (Image.new("L", (5, 5), 128), Image.new("RGBA", (5, 5), (1, 2, 3, 4)), Image.new("LA", (5, 5))):
        assert decode_image(encode(image, "PNG"), LIMIT).mode == "RGB"
    deep = Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16))
    assert decode_image(encode(deep, "PNG"), LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees
    decoded = decode_image(encode(image, "JPEG", exif=exif), LIMIT)
    assert decoded.size == (20, 40)
