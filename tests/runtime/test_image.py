"""Image files: the type from the name, the parameters where A1111 writes (and reads) them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ExifTags, Image

from edgediff.errors import UsageError, command_line
from edgediff.runtime.image import encode, image_format, read_parameters, save_image, save_video

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


def _frames(n: int = 4, size=(24, 16)) -> list[Image.Image]:
    frames = [Image.new("RGB", size, (60 * i, 255 - 60 * i, 90)) for i in range(n)]
    frames[0].info["parameters"] = TEXT
    return frames


@pytest.mark.parametrize(("name", "fmt", "fps", "duration"), [("a.webp", "WEBP", 7, 143), ("a.WEBP", "WEBP", 10, 100),
                                                                ("a.gif", "GIF", 10, 100), ("a.gif", "GIF", 5, 200)])
def test_a_video_carries_its_frames_timing_and_parameters(tmp_path, name, fmt, fps, duration):
    path = save_video(_frames(), tmp_path / name, fps)
    assert list(tmp_path.iterdir()) == [path]  # no scratch file left
    with Image.open(path) as img:
        assert img.format == fmt and img.n_frames == 4 and img.size == (24, 16) and img.info["loop"] == 0
        assert read_parameters(img) == TEXT
        for n in range(img.n_frames):
            img.seek(n)
            img.load()  # WebP's duration is read with the frame
            assert img.info["duration"] == duration
            if fmt == "WEBP":  # lossy, but each frame is its own colour
                assert abs(int(np.asarray(img.convert("RGB"))[..., 0].mean()) - 60 * n) < 8


def test_a_video_parameters_given_win_and_none_read_none(tmp_path):
    path = save_video(_frames(), tmp_path / "a.gif", 7, parameters="other")
    with Image.open(path) as img:
        assert read_parameters(img) == "other"
    for name in ("b.gif", "b.webp"):
        with Image.open(save_video([Image.new("RGB", (8, 8))] * 2, tmp_path / name, 7)) as img:
            assert read_parameters(img) is None


@pytest.mark.parametrize("name", ["a.png", "a.mp4", "a.jpg", "a"])
def test_a_video_of_another_extension_is_an_error(tmp_path, name):
    with pytest.raises(UsageError, match=r"animated \.webp or \.gif, not .*; for one PNG a frame save_image each"):
        save_video(_frames(), tmp_path / name, 7)
    with command_line(), pytest.raises(UsageError, match="for one PNG a frame give --frames-dir DIR"):
        save_video(_frames(), tmp_path / name, 7)
    with pytest.raises(UsageError, match="no frames"):
        save_video([], tmp_path / "a.webp", 7)
    with pytest.raises(UsageError, match="fps"):
        save_video(_frames(), tmp_path / "a.webp", 0)
    assert list(tmp_path.iterdir()) == []
