"""What a segmentation version's tiling gives on large images: held-out slices enlarged, through HTTP.

    .venv-dev/bin/python -m bench.segmentation_tiling [--versions 1.4.0 1.3.0] [--sides 512 1024 1500 2048]

The held-out slices 25-29 are 512 x 512, where every tiling in ``models/segmentation`` cuts four
tiles in the same places. Versions that differ only in their tiling (1.4.0 is 1.3.0's model file
laid out with a margin of 8 instead of 16) part on larger images, where the margin decides how many
tiles there are and so how much real context each pixel beside a seam has. Each slice is enlarged
to each side (bilinear; its label nearest), posted as a PNG to one server per version (gunicorn, one
worker, the version pinned with ``MODEL_VERSIONS``; the servers take turns), and the returned masks
are scored against the enlarged labels over all pixels together. An enlarged slice is not what the
model was trained on (its membranes are thicker), so the scores fall with the side for every
version; what the bench compares is the versions on the same images: their scores, the share of
mask pixels on which they differ, their tiles and their median time per image.

Writes ``bench/results/segmentation_tiling.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time

import httpx
import numpy as np
from PIL import Image

from app.tasks.segmentation.preprocess import TileLayout, segmentation_metrics
from bench.common import SHARED_DATA, png_bytes, serving_python, write_results
from bench.liveserver import running_server
from bench.segmentation import TEST_SLICES, URL
from bench.segmentation_speed import tiling


def enlarged(index: int, side: int) -> tuple[bytes, np.ndarray]:
    """Held-out slice ``index`` at ``side`` x ``side`` as a PNG, and its membrane mask (bool)."""
    data_dir = SHARED_DATA / "membrane" / "train"
    image = Image.open(data_dir / "image" / f"{index}.png").convert("L")
    label = Image.open(data_dir / "label" / f"{index}.png").convert("L")
    if side != image.width:
        image, label = image.resize((side, side), Image.BILINEAR), label.resize((side, side), Image.NEAREST)
    return png_bytes(np.asarray(image)), np.asarray(label) < 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=["1.4.0", "1.3.0"])
    parser.add_argument("--sides", nargs="+", type=int, default=[512, 1024, 1500, 2048])
    args = parser.parse_args()
    python = serving_python()
    masks: dict[str, dict[int, list[np.ndarray]]] = {v: {side: [] for side in args.sides} for v in args.versions}
    seconds: dict[str, dict[int, list[float]]] = {v: {side: [] for side in args.sides} for v in args.versions}
    truth: dict[int, list[np.ndarray]] = {side: [] for side in args.sides}
    with contextlib.ExitStack() as stack:
        clients = {}
        for version in args.versions:
            live = stack.enter_context(running_server(
                workers=1, python=python, env={"MODEL_VERSIONS": json.dumps({"segmentation": version})}))
            clients[version] = stack.enter_context(httpx.Client(base_url=live.base_url, timeout=60))
            served = clients[version].get("/v1/models/segmentation").json()["version"]
            assert served == version, (served, version)
        for side in args.sides:
            for index in TEST_SLICES:
                body, membrane = enlarged(index, side)
                truth[side].append(membrane)
                for version, client in clients.items():  # the servers take turns on each image
                    started = time.perf_counter()
                    response = client.post(URL, files={"image": ("image.png", body, "image/png")})
                    seconds[version][side].append(time.perf_counter() - started)
                    response.raise_for_status()
                    mask = np.asarray(Image.open(io.BytesIO(response.content))) == 255
                    assert mask.shape == membrane.shape
                    masks[version][side].append(mask)
    result: dict = {"held_out_slices": TEST_SLICES, "sides": args.sides, "versions": {}}
    first = args.versions[0]
    for version in args.versions:
        tile, margin = tiling(version)
        rows = {}
        for side in args.sides:
            scores = segmentation_metrics(np.stack(masks[version][side]), np.stack(truth[side]))
            differ = float(np.mean(np.stack(masks[version][side]) != np.stack(masks[first][side])))
            rows[str(side)] = {"tiles": len(TileLayout(side, side, tile, margin)),
                               "pixel_accuracy": round(scores["pixel_accuracy"], 4),
                               "iou_membrane": round(scores["iou_membrane"], 4),
                               f"mask_pixels_differing_from_{first}": round(differ, 5),
                               "median_ms": round(statistics.median(seconds[version][side]) * 1000, 1)}
            print(f"{version} (tile {tile}, margin {margin}) {side}x{side}: {rows[str(side)]}", flush=True)
        result["versions"][version] = {"tile": tile, "margin": margin, "by_side": rows}
    write_results("segmentation_tiling", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
