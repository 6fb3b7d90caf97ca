"""Image bytes -> Pillow image, with the limits applied in one place and before any pixel is decoded.

:func:`open_image` reads only the header: the format (415 naming the supported ones when unknown),
the size (413 past the pixel limit) and, for JPEG, the number of scans (422 past
:data:`MAX_JPEG_SCANS`: a progressive JPEG re-reads every coefficient once per scan, so 75 000
tiny scans in 1.2 MB would cost minutes of CPU). Callers sum the sizes of every image of a request
against its pixel budget before they decode any of them. :func:`decode_image` then decodes the first
frame only (animated GIF/WebP, multi-page TIFF: the other frames and pages are never read or counted),
applies the EXIF orientation (phone photos) and turns truncated or corrupt files into a 422.
"""

from __future__ import annotations

import functools
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import ProblemError
from app.core.execution import memory_budget
from app.core.limits import MAX_JPEG_SCANS

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})
_SOS = b"\xff\xda"  # JPEG start-of-scan marker; entropy-coded data never contains it (byte stuffing)
# Where Pillow's getexif() finds an orientation (ImageOps.exif_transpose reads it from there): EXIF
# in ``info`` (JPEG APP1, PNG eXIf, WebP), a PNG text chunk, XMP, or a TIFF's own tags.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")

# Pillow warns between its own pixel limit and twice it; in this service that is the error it is
# (a 413). Set once for the process: a per-call warnings.catch_warnings() costs more than the check.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@functools.lru_cache(maxsize=16)
def _format_list(formats: frozenset[str]) -> list[str]:
    return sorted(formats)


def open_image(data: bytes, field: str, *, max_pixels: int,
               formats: frozenset[str] = DEFAULT_FORMATS) -> Image.Image:
    """Identify ``data`` and check its header against the limits; no pixel is decoded yet."""
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    try:
        image = Image.open(io.BytesIO(data), formats=_format_list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProblemError(413, "image-too-large", f"{field}: {exc}", field=field,
                           max_pixels=max_pixels) from exc
    except UnidentifiedImageError as exc:
        supported = _format_list(formats)
        raise ProblemError(415, "unsupported-image-format",
                           f"{field} is not an image in a supported format "
                           f"({', '.join(supported)}).",
                           field=field, supported=list(supported)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        raise ProblemError(422, "corrupt-image", f"{field} could not be read: {exc}.",
                           field=field) from exc
    if image.width < 1 or image.height < 1:
        raise ProblemError(422, "empty-image", f"{field} has no pixels.", field=field)
    if image.width * image.height > max_pixels:
        raise ProblemError(413, "image-too-large",
                           f"{field} is {image.width}x{image.height} pixels; the limit is "
                           f"{max_pixels} pixels per image.", field=field, max_pixels=max_pixels)
    memory_budget(image.width * image.height * len(image.getbands()))  # what decoding it takes
    if image.format == "JPEG":
        scans = data.count(_SOS)
        if scans > MAX_JPEG_SCANS:
            raise ProblemError(422, "too-many-scans",
                               f"{field} is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} "
                               "are accepted (ordinary progressive JPEGs have about 10).",
                               field=field, max_scans=MAX_JPEG_SCANS)
    return image


def check_request_pixels(images: list[Image.Image], field: str, max_request_pixels: int) -> int:
    """The pixels the images of one request hold in all; 413 when more than the request's budget."""
    total = sum(image.width * image.height for image in images)
    if total > max_request_pixels:
        raise ProblemError(413, "request-too-large",
                           f"The {len(images)} images in {field} hold {total} pixels in all; the "
                           f"limit is {max_request_pixels} pixels per request.", field=field,
                           max_request_pixels=max_request_pixels)
    return total


def load_image(image: Image.Image, field: str) -> Image.Image:
    """Decode the first frame of an image from :func:`open_image` (fully, so corrupt files fail
    here and not later) and apply its EXIF orientation."""
    try:
        image.load()
        if _may_have_orientation(image):
            # In place: without it Pillow returns a full copy even when there is nothing to turn
            # (another 64 MB for a 4096 x 4096 photo).
            ImageOps.exif_transpose(image, in_place=True)
        return image
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, ZeroDivisionError) as exc:
        raise ProblemError(422, "corrupt-image", f"{field} could not be decoded: {exc}.",
                           field=field) from exc


def _may_have_orientation(image: Image.Image) -> bool:
    """Whether a loaded image carries metadata an orientation could be in: most uploads (a canvas
    PNG, a scan) carry none, and asking Pillow to parse what is not there is a fifth of decoding a
    small image."""
    info = image.info
    # EXIF parsed already, a TIFF's own tags, or any of the places getexif() reads
    return (getattr(image, "_exif", None) is not None or hasattr(image, "tag_v2")
            or any(key in info for key in _ORIENTATION_SOURCES))


def decode_image(data: bytes, field: str, *, max_pixels: int,
                 formats: frozenset[str] = DEFAULT_FORMATS) -> Image.Image:
    """:func:`open_image` then :func:`load_image`: one upload, checked and decoded."""
    return load_image(open_image(data, field, max_pixels=max_pixels, formats=formats), field)
