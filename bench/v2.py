"""A 256-digit batch three ways on the live server (one worker): V2 binary tensors (tritonclient's
default), v1 multipart (256 PNG files) and v1 JSON (256 ``pixels`` arrays), alternating rounds.

For each: the client's wall time per request (encoding, transfer, server, decoding: what a caller
waits) and the server's own time (``Server-Timing`` total), medians over the rounds, and the ratios
to V2 binary. Writes bench/results/v2.json.

    python -m bench.v2 [--rounds 8] [--per-round 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import httpx
import numpy as np

from bench.common import SHARED_DATA, png_bytes, serving_python, write_results
from bench.liveserver import running_server


def server_ms(headers: httpx.Headers | dict[str, str]) -> float:
    timing = headers.get("server-timing", "")
    return float(next(p.split("dur=")[1] for p in timing.split(", ") if p.startswith("total")))


def main() -> None:
    import tritonclient.http as tritonhttp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=5)
    args = parser.parse_args()
    with np.load(SHARED_DATA / "mnist" / "mnist.npz") as data:
        images, labels = data["x_test"][:256], data["y_test"][:256]
    pngs = [png_bytes(image) for image in images]

    with running_server(workers=1, python=serving_python()) as live, \
            httpx.Client(base_url=live.base_url, timeout=60) as client:
        triton = tritonhttp.InferenceServerClient(live.base_url.removeprefix("http://"), network_timeout=60)

        def v2_binary() -> tuple[list[str], float]:
            tensor = tritonhttp.InferInput("pixels", [256, 28, 28], "FP32")
            tensor.set_data_from_numpy(images.astype(np.float32), binary_data=True)
            result = triton.infer("digits", [tensor], outputs=[tritonhttp.InferRequestedOutput("label")])
            return [x.decode() for x in result.as_numpy("label")], float("nan")  # no headers: see below

        def v2_binary_raw() -> tuple[list[str], float]:
            # tritonclient hides the response headers; the same request through httpx gives the
            # server's time (the body is byte for byte what tritonclient sends).
            header = json.dumps({"inputs": [{"name": "pixels", "shape": [256, 28, 28], "datatype": "FP32",
                                             "parameters": {"binary_data_size": 256 * 784 * 4}}],
                                 "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
            response = client.post("/v2/models/digits/infer", content=header + images.astype(np.float32).tobytes(),
                                   headers={"Inference-Header-Content-Length": str(len(header))})
            response.raise_for_status()
            return [], server_ms(response.headers)

        def v1_multipart() -> tuple[list[str], float]:
            response = client.post("/v1/digits/predict",
                                   files=[("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)])
            response.raise_for_status()
            return [p["label"] for p in response.json()["predictions"]], server_ms(response.headers)

        def v1_json() -> tuple[list[str], float]:
            response = client.post("/v1/digits/predict",
                                   content=json.dumps({"instances": [{"pixels": im.tolist()} for im in images]}),
                                   headers={"content-type": "application/json"})
            response.raise_for_status()
            return [p["label"] for p in response.json()["predictions"]], server_ms(response.headers)

        variants: dict[str, Callable[[], tuple[list[str], float]]] = {
            "v2 binary (tritonclient)": v2_binary, "v1 multipart (256 PNGs)": v1_multipart,
            "v1 json (pixels)": v1_json}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        server: dict[str, list[float]] = {name: [] for name in variants}
        answers = {name: fn()[0] for name, fn in variants.items()}  # warm-up, and the answers agree
        for _ in range(args.rounds):
            for name, fn in variants.items():
                for _ in range(args.per_round):
                    started = time.perf_counter()
                    _, ms = fn()
                    wall[name].append((time.perf_counter() - started) * 1000)
                    if name.startswith("v2"):
                        _, ms = v2_binary_raw()
                    server[name].append(ms)
        triton.close()

    accuracy = {name: float(np.mean(np.array(a) == labels.astype(str))) for name, a in answers.items()}
    base = statistics.median(wall["v2 binary (tritonclient)"])
    results = {name: {"client_wall_ms_p50": round(statistics.median(wall[name]), 2),
                      "server_ms_p50": round(statistics.median(server[name]), 2),
                      "wall_vs_v2_binary": round(statistics.median(wall[name]) / base, 2),
                      "accuracy_256": accuracy[name]} for name in variants}
    for name, r in results.items():
        print(f"{name:28s} client {r['client_wall_ms_p50']:8.1f} ms  server {r['server_ms_p50']:7.1f} ms  "
              f"x{r['wall_vs_v2_binary']:.2f} of V2 binary  accuracy {r['accuracy_256']:.4f}")
    write_results("v2", {"batch": 256, "rounds": args.rounds, "per_round": args.per_round,
                         "workers": 1, "variants": results})


if __name__ == "__main__":
    main()
