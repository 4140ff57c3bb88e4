"""Image files: the type from the name, the parameters where A1111 writes (and reads) them."""

from __future__ import annotations

import pytest
from PIL import ExifTags, Image

from edgediff.errors import UsageError
from edgediff.runtime.image import encode, image_format, read_parameters, save_image

TEXT = "a cat, café\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, Seed: 42, Size: 64x64"


@pytest.mark.parametrize(("name", "fmt"), [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"),
                                           ("a.webp", "WEBP")])
def test_each_type_carries_the_parameters(tmp_path, name, fmt):
    path = save_image(Image.new("RGB", (16, 8), (200, 30, 30)), tmp_path / name, TEXT)
    assert list(tmp_path.iterdir()) == [path]  # no scratch file left
    with Image.open(path) as img:
        assert img.format == fmt and img.size == (16, 8)
        assert read_parameters(img) == TEXT


def test_png_text_chunk_and_exif_user_comment_as_a1111_writes_them(tmp_path):
    """PNG: a tEXt/iTXt 'parameters' chunk. JPEG and WebP: EXIF UserComment in the Exif IFD, the
    8-byte 'UNICODE\\0' code then UTF-16 big-endian (piexif.helper.UserComment.dump(encoding=
    'unicode'), which A1111 writes and reads back)."""
    save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png", TEXT)
    with Image.open(tmp_path / "a.png") as img:
        assert img.text["parameters"] == TEXT
    for name in ("a.jpg", "a.webp"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / name, TEXT)
        with Image.open(tmp_path / name) as img:
            raw = img.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert raw == b"UNICODE\0" + TEXT.encode("utf-16-be")


def test_encode_gives_the_bytes_the_server_can_send():
    data = encode(Image.new("RGB", (8, 8)), "JPEG", TEXT)
    assert data[:2] == b"\xff\xd8" and b"Exif\0\0" in data[:64]


@pytest.mark.parametrize("name", ["a.gif", "a", "a.png.txt"])
def test_an_unknown_extension_is_an_error(tmp_path, name):
    with pytest.raises(UsageError, match=r"cannot tell the image type from .*end the name in \.png, \.jpg, "
                                         r"\.jpeg, \.webp"):
        image_format(tmp_path / name)
    with pytest.raises(UsageError):
        save_image(Image.new("RGB", (8, 8)), tmp_path / name, TEXT)
    assert list(tmp_path.iterdir()) == []


def test_no_parameters_reads_none():
    assert read_parameters(Image.new("RGB", (8, 8))) is None
