"""Phone photos are turned upright before any task sees them, wherever the orientation is stored.

``load_image`` skips Pillow's EXIF parsing for images that carry no metadata at all (most uploads:
canvas PNGs, scans); these tests hold it to turning every image that does carry an orientation.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.core.codecs.image import decode_image

ROTATE_270 = 6  # EXIF orientation: the camera was turned; the stored 40x20 image shows as 20x40


def photo(mode: str = "RGB") -> Image.Image:
    """40 wide, 20 high, the left half dark: a turned image is 20 wide and 40 high."""
    pixels = np.full((20, 40), 230, dtype=np.uint8)
    pixels[:, :20] = 20
    return Image.fromarray(pixels).convert(mode)


def exif(orientation: int) -> Image.Exif:
    data = Image.Exif()
    data[0x0112] = orientation
    return data


def saved(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
       b'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
       b'</rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("name, data", [
    ("jpeg-exif", saved(photo(), "JPEG", exif=exif(ROTATE_270))),
    ("png-exif-chunk", saved(photo(), "PNG", exif=exif(ROTATE_270))),
    ("webp-exif", saved(photo(), "WEBP", exif=exif(ROTATE_270), lossless=True)),
    ("tiff-exif", saved(photo(), "TIFF", exif=exif(ROTATE_270))),
    ("tiff-tag", saved(photo(), "TIFF", tiffinfo={0x0112: ROTATE_270})),
    ("jpeg-xmp", saved(photo(), "JPEG", xmp=XMP)),
])
def test_an_orientation_is_applied_wherever_it_is_stored(name, data):
    image = decode_image(data, "image", max_pixels=10**6)
    assert image.size == (20, 40), name
    top, bottom = np.asarray(image.convert("L"))[[0, -1], 10]
    assert top < 128 < bottom, name  # rotated 270 degrees: the dark left half is now on top


@pytest.mark.parametrize("format", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_an_image_without_an_orientation_is_left_as_it_is(format):
    image = decode_image(saved(photo(), format), "image", max_pixels=10**6)
    assert image.size == (40, 20)
    upright = decode_image(saved(photo(), format, exif=exif(1)) if format in ("JPEG", "PNG", "WEBP", "TIFF")
                           else saved(photo(), format), "image", max_pixels=10**6)
    assert upright.size == (40, 20)
