"""Image bytes -> Pillow image, with the limits applied in one place.

Pillow's decompression-bomb guard is turned into a 413, unknown formats into a 415 naming the
supported ones, and truncated or corrupt files into a 422. EXIF orientation is applied (phone
photos), and animated formats give their first frame.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import ProblemError

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})


def decode_image(data: bytes, field: str, *, max_pixels: int,
                 formats: frozenset[str] = DEFAULT_FORMATS) -> Image.Image:
    """Decode ``data`` fully (so corrupt files fail here, not later) and return a Pillow image."""
    if not data:
        raise ProblemError(422, "empty-file", f"{field} is empty.", field=field)
    supported = ", ".join(sorted(formats))
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and 2x; treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(formats))
            if image.width * image.height > max_pixels:
                raise ProblemError(413, "image-too-large",
                                   f"{field} is {image.width}x{image.height} pixels; the limit is "
                                   f"{max_pixels} pixels.", field=field)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
    except ProblemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProblemError(413, "image-too-large", f"{field}: {exc}", field=field) from exc
    except UnidentifiedImageError as exc:
        raise ProblemError(415, "unsupported-image-format",
                           f"{field} is not an image in a supported format ({supported}).",
                           field=field, supported=sorted(formats)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ProblemError(422, "corrupt-image", f"{field} could not be decoded: {exc}.",
                           field=field) from exc
    if image.width < 1 or image.height < 1:
        raise ProblemError(422, "empty-image", f"{field} has no pixels.", field=field)
    return image
