"""Hostile uploads, made in the test (none is committed): small files that expand into a lot of
memory or CPU if a server trusts their headers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf
from PIL import Image


def flac_dc(rate: int, seconds: float, level: float = 0.25) -> bytes:
    """Mono FLAC of a constant level: compresses to almost nothing, whatever its length and rate."""
    buffer = io.BytesIO()
    sf.write(buffer, np.full(int(rate * seconds), level, dtype=np.float32), rate, format="FLAC")
    return buffer.getvalue()


def wav_noise(rate: int, seconds: float) -> bytes:
    """16-bit mono WAV of low noise at ``rate`` (any rate libsndfile will write)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    sf.write(buffer, rng.normal(0, 0.1, int(rate * seconds)).astype(np.float32), rate, format="WAV",
             subtype="PCM_16")
    return buffer.getvalue()


def tiff_pages(pages: int, side: int = 1) -> bytes:
    """A little-endian TIFF of ``pages`` tiny grayscale pages that share one strip: ~100 bytes a page,
    so 95 000 pages fit in 10 MB. Walking every page (``n_frames``) costs seconds of CPU."""
    entries = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, side), (279, 4, 1, side * side)]
    strip = bytes([128]) * (side * side)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8 + len(strip)) + strip)  # header, then the strip
    ifd_size = 2 + 12 * len(entries) + 4
    offset = len(out)
    for page in range(pages):
        next_offset = offset + ifd_size if page < pages - 1 else 0
        ifd = struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
            ifd += struct.pack("<HHI", tag, kind, count) + packed
        out += ifd + struct.pack("<I", next_offset)
        offset += ifd_size
    return bytes(out)


def jpeg_scans(scans: int, side: int = 512) -> bytes:
    """A progressive JPEG whose last (tiny) scan is repeated until it has ``scans`` scans: every
    scan makes the decoder revisit every coefficient block of the image."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    present = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * max(0, scans - present) + data[end:]


def big_digit_png(side: int = 4096) -> bytes:
    """A large, almost blank PNG with a bar of ink: tens of KB on the wire, 16 M pixels decoded."""
    array = np.full((side, side), 255, dtype=np.uint8)
    array[side // 4: 3 * side // 4, side // 2 - side // 40: side // 2 + side // 40] = 0
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def flat_png(side: int, colours: int = 16) -> bytes:
    """A ``side`` x ``side`` RGB PNG in bands of ``colours`` colours (compresses well)."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    bands = np.repeat(palette, -(-side // colours), axis=0)[:side]
    array = np.repeat(bands[:, None, :], side, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def padded_png(png: bytes, size: int) -> bytes:
    """``png`` grown to ``size`` bytes by a private ancillary chunk before IEND: a valid image that
    decodes to the same pixels, as large on the wire as wanted."""
    end = png.rindex(b"IEND") - 4
    pad = max(0, size - len(png) - 12)
    kind = b"prVt"
    chunk = struct.pack(">I", pad) + kind + bytes(pad) + struct.pack(">I", zlib.crc32(kind + bytes(pad)))
    return png[:end] + chunk + png[end:]
