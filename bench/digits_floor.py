"""The project's digits endpoint against the bare floor and other serving frameworks, one run.

    .venv-dev/bin/python -m bench.digits_floor [--rounds 6] [--requests 3000] [--concurrency 8]
                                               [--before bc768db] [--frameworks PYTHON]

Served by gunicorn with one uvicorn worker (the serving environment when it exists): the project
(``/v1/digits/predict``, a raw PNG body: decode, real-world preprocessing, prediction log, drift
features, metrics, access log), the project as it was at ``--before`` (a commit, extracted with
``git archive`` into ``var/``; ``--before ''`` leaves it out) and ``bench/floor_app.py`` (Pillow
decode + one LiteRT call). The project is also sent the same digit as a V2 binary tensor
(``/v2/models/digits/infer``: FP32 ``pixels`` [1, 28, 28] after a JSON header, the ``label`` output
binary, as tritonclient sends it), for the V2 protocol's throughput beside v1's.

Where ``.venv-frameworks`` exists (``make .venv-frameworks/.installed``; or ``--frameworks``, a
Python with ``bench/requirements-frameworks.txt``), the floor's work is also served by MLServer (a
custom runtime, V2 JSON, one process: ``parallel_workers`` 0) and LitServe (a ``LitAPI``; its API
server and inference worker are two processes), see ``bench/frameworks/``. Neither reads a raw
body, so they get the PNG in base64 inside JSON, and so does a second project target
(``{"instances": [{"image_b64": ...}]}``) for a like-for-like comparison.

``hey`` posts the same MNIST digit to each in turn, ``rounds`` times; reported are the medians and,
as the ratio to the floor, the median of the rounds' ratios (each round's targets run back to back,
so the machine's drift over the run cancels); the ratio of the medians is kept beside it, and V2's to
v1's the same way. Then ``bench/digits_stages.py`` breaks one request down by stage, in one
process, for both trees. Writes ``bench/results/digits_floor.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import REPO_ROOT, checkout, mnist_digit_pixels, mnist_digit_png, serving_python, write_results
from bench.liveserver import free_port, running_server, stop
from bench.load import hey

RAW_BODY = "application/octet-stream"
FRAMEWORKS_PYTHON = REPO_ROOT / ".venv-frameworks" / "bin" / "python"


@contextlib.contextmanager
def serving(command: list[str], url: str, body: bytes, content_type: str, env: dict[str, str] | None = None):
    """Run ``command`` (its own process group) until ``url`` answers ``body`` with a 200."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{command[:3]} did not start")
            time.sleep(0.3)
        yield url
    finally:
        stop(process)


def floor_server(python: str | None):
    port = free_port()
    gunicorn = str(Path(python or sys.executable).parent / "gunicorn")
    return serving([gunicorn, "-k", "uvicorn_worker.UvicornWorker", "-w", "1", "--bind", f"127.0.0.1:{port}",
                    "bench.floor_app:app"], f"http://127.0.0.1:{port}/predict", mnist_digit_png(), "image/png")


def v2_binary_body() -> tuple[bytes, dict[str, str]]:
    """The benches' MNIST digit as the V2 binary request tritonclient makes, and its one extra header."""
    pixels = mnist_digit_pixels()[None]
    header = json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    return header + pixels.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def mlserver_server(python: Path, png: bytes):
    ports = [free_port() for _ in range(3)]
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}]}).encode()
    env = {"PYTHONPATH": str(REPO_ROOT / "bench" / "frameworks"), "MLSERVER_HTTP_PORT": str(ports[0]),
           "MLSERVER_GRPC_PORT": str(ports[1]), "MLSERVER_METRICS_PORT": str(ports[2]),
           "MLSERVER_PARALLEL_WORKERS": "0", "MLSERVER_DEBUG": "false"}
    url = f"http://127.0.0.1:{ports[0]}/v2/models/digits/infer"
    return serving([str(python.parent / "mlserver"), "start", "bench/frameworks/mlserver"], url, body,
                   "application/json", env), body


def litserve_server(python: Path, png: bytes):
    port = free_port()
    body = json.dumps({"image_b64": b64(png)}).encode()
    return serving([str(python), "bench/frameworks/litserve_app.py", str(port)], f"http://127.0.0.1:{port}/predict",
                   body, "application/json"), body


def stages(python: str | None, tree: Path) -> dict:
    out = subprocess.run([python or sys.executable, str(REPO_ROOT / "bench" / "digits_stages.py"),
                          "--tree", str(tree)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--before", default="bc768db", help="the commit to compare with ('' for none)")
    parser.add_argument("--frameworks", type=Path, default=FRAMEWORKS_PYTHON,
                        help="a Python with bench/requirements-frameworks.txt (MLServer, LitServe)")
    args = parser.parse_args()
    png = mnist_digit_png()
    json_png = json.dumps({"instances": [{"image_b64": b64(png)}]}).encode()
    python = serving_python()
    before = checkout(args.before) if args.before else None
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(running_server(workers=1, python=python))
        v2_body, v2_headers = v2_binary_body()
        targets = {"project": (live.base_url + "/v1/digits/predict", png, "image/png", {}),
                   "floor": (stack.enter_context(floor_server(python)), png, "image/png", {}),
                   "project_v2_binary": (live.base_url + "/v2/models/digits/infer", v2_body,
                                         RAW_BODY, v2_headers)}
        if before is not None:
            old = stack.enter_context(running_server(workers=1, python=python, cwd=before))
            targets["before"] = (old.base_url + "/v1/digits/predict", png, "image/png", {})
        if args.frameworks.exists():
            targets["project_json_base64"] = (live.base_url + "/v1/digits/predict", json_png,
                                              "application/json", {})
            for name, start in (("mlserver", mlserver_server), ("litserve", litserve_server)):
                server, body = start(args.frameworks, png)
                targets[name] = (stack.enter_context(server), body, "application/json", {})
        else:
            print(f"MLServer and LitServe left out: no {args.frameworks} (make .venv-frameworks/.installed)", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for url, body, content_type, headers in targets.values():  # warm up
            hey(url, body, content_type, 300, args.concurrency, headers=headers)
        for _ in range(args.rounds):
            for name, (url, body, content_type, headers) in targets.items():
                runs[name].append(hey(url, body, content_type, args.requests, args.concurrency, headers=headers))
                print(f"{name}: {runs[name][-1]['throughput_rps']} req/s, p50 {runs[name][-1]['p50_ms']} ms",
                      flush=True)
    result = {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
              "before_commit": args.before or None,
              "bodies": {name: content_type for name, (_, _, content_type, _) in targets.items()}}
    for name, rs in runs.items():
        result[name] = {"throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                        "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                        "failed": sum(r["failed"] for r in rs),
                        "rounds_rps": [r["throughput_rps"] for r in rs]}
    result["ratios_to_floor"] = {
        name: round(statistics.median(r["throughput_rps"] / f["throughput_rps"]
                                      for r, f in zip(rs, runs["floor"], strict=True)), 3)
        for name, rs in runs.items()}
    result["ratios_of_medians_to_floor"] = {
        name: round(result[name]["throughput_rps"] / result["floor"]["throughput_rps"], 3) for name in runs}
    print("of the floor: " + ", ".join(f"{name} {ratio}" for name, ratio in result["ratios_to_floor"].items()),
          flush=True)
    result["v2_binary_to_v1"] = round(statistics.median(
        v2["throughput_rps"] / v1["throughput_rps"]
        for v2, v1 in zip(runs["project_v2_binary"], runs["project"], strict=True)), 3)
    print(f"V2 binary to v1 PNG on the project: {result['v2_binary_to_v1']}", flush=True)
    # Per stage, in one process, after the load runs (nothing else on the cores).
    result["stages_us"] = {"project": stages(python, REPO_ROOT)}
    if before is not None:
        result["stages_us"]["before"] = stages(python, before)
    for name, breakdown in result["stages_us"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in breakdown["cpu_us"].items())
              + f"; whole request {breakdown['request_in_process']:g} us (floor "
              f"{breakdown['floor_request_in_process']:g}), the rest {breakdown['routing_middleware_admission_rest']:g}",
              flush=True)
    write_results("digits_floor", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
