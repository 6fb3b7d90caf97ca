"""Triton's perf_analyzer against the service's V2 protocol, unmodified, for digits.

    make perf-analyzer-root                       # once: where the machine's glibc is older than 2.38
    .venv-dev/bin/python -m bench.perf_analyzer [--concurrency 1,4,7] [--interval-ms 3000]

perf_analyzer (the ``perf-analyzer`` wheel) needs glibc 2.38. Where the machine has it, the
``perf_analyzer`` on PATH is used. Otherwise it runs inside ``var/perf-analyzer-root`` (``--root``):
a Debian trixie root made by ``make perf-analyzer-root`` (debootstrap, then the wheels installed
offline in a venv there), entered with ``chroot`` (root needed). The chroot shares the machine's
network, so it reaches the server on 127.0.0.1.

The service runs as in production (gunicorn, one worker, the Procfile's settings). perf_analyzer
reads the model's metadata and configuration from ``/v2/models/digits`` and ``.../config``, and
sends one MNIST digit as the FP32 ``pixels`` tensor, binary both ways, as tritonclient does.
Where ``.venv-frameworks`` exists, MLServer serving the floor's digit (``bench/frameworks/``) is
tried in the same run; what perf_analyzer says about it is recorded as it is. Writes
``bench/results/perf_analyzer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


from bench.common import REPO_ROOT, mnist_digit_pixels, mnist_digit_png, serving_python, write_results
from bench.digits_floor import FRAMEWORKS_PYTHON, mlserver_server
from bench.liveserver import running_server

ROOT = REPO_ROOT / "var" / "perf-analyzer-root"
IN_ROOT = "/opt/pa/bin/perf_analyzer"


def runner(root: Path) -> tuple[list[str], Path, str]:
    """The command prefix, the folder where input files go and that folder as perf_analyzer sees it."""
    if (root / IN_ROOT.lstrip("/")).exists():
        if os.geteuid() != 0:
            raise SystemExit(f"perf_analyzer is in {root}: entering it with chroot needs root")
        folder = root / "tmp"
        return ["chroot", str(root), IN_ROOT], folder, "/tmp"
    native = shutil.which("perf_analyzer")
    if native and subprocess.run([native, "--version"], capture_output=True, check=False).returncode != 127:
        folder = Path(tempfile.mkdtemp(prefix="perf-analyzer-"))
        return [native], folder, str(folder)
    raise SystemExit(f"no perf_analyzer that runs here: make perf-analyzer-root (creates {root})")


def digit_input(folder: Path, seen_as: str) -> str:
    pixels = mnist_digit_pixels()
    path = folder / "digit-input.json"
    path.write_text(json.dumps({"data": [{"pixels": {"content": [float(v) for v in pixels.ravel()],
                                                      "shape": [28, 28]}}]}))
    return f"{seen_as}/digit-input.json"


def measure(command: list[str], folder: Path, seen_as: str, port: int, concurrency: int, interval_ms: int,
            input_data: str) -> dict:
    report = f"report-{port}-{concurrency}.csv"
    done = subprocess.run([*command, "-m", "digits", "-u", f"127.0.0.1:{port}", "-i", "http",
                           "--concurrency-range", f"{concurrency}:{concurrency}",
                           "--measurement-interval", str(interval_ms), "--input-data", input_data,
                           "--input-tensor-format", "binary", "--output-tensor-format", "binary",
                           "-f", f"{seen_as}/{report}"], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not (folder / report).exists():  # perf_analyzer's own words
        said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return {"error": " / ".join(said[-3:]) or f"exit {done.returncode}, no report"}
    row = next(csv.DictReader((folder / report).open()))
    (folder / report).unlink()
    return {"throughput_infer_s": round(float(row["Inferences/Second"]), 1),
            "p50_ms": round(int(row["p50 latency"]) / 1000, 3), "p99_ms": round(int(row["p99 latency"]) / 1000, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--concurrency", default="1,4,7")
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    command, folder, seen_as = runner(args.root)
    input_data = digit_input(folder, seen_as)
    levels = [int(c) for c in args.concurrency.split(",")]
    result: dict = {"perf_analyzer": " ".join(command), "concurrency": levels, "interval_ms": args.interval_ms,
                    "input": "one MNIST digit, FP32 pixels [1, 28, 28], binary tensors both ways"}
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(running_server(workers=1, python=serving_python()))
        targets = {"project": int(live.base_url.rsplit(":", 1)[1])}
        if FRAMEWORKS_PYTHON.exists():
            server, _ = mlserver_server(FRAMEWORKS_PYTHON, mnist_digit_png())
            url = stack.enter_context(server)
            targets["mlserver"] = int(url.split(":")[2].split("/")[0])
        for name, port in targets.items():
            result[name] = {str(c): measure(command, folder, seen_as, port, c, args.interval_ms, input_data)
                            for c in levels}
            print(f"{name}: {json.dumps(result[name])}", flush=True)
    write_results("perf_analyzer", result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
