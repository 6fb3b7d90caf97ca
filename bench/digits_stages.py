"""Where a digit request's time goes, stage by stage, in one process.

    .venv/bin/python bench/digits_stages.py [--tree PATH] [--requests 3000]

Imports the app from ``--tree`` (this checkout by default; ``bench/digits_floor.py`` also points it
at a worktree of the commit given as ``--before``) and times, in CPU microseconds per request (the best
of 3 rounds of many calls; the prediction-log writer's thread included where it runs):

* each stage alone: Pillow decode, the real-world preprocessing, the drift features, one LiteRT call,
  the prediction-log row (queued, then written in batches to SQLite), the access-log line and the
  request metrics, the JSON answer (each as the tree's request path does it);
* the model's call after the decode and preprocessing, as a request makes it: what it takes beyond
  the call alone is the cost of the weights being pushed out of the CPU's cache by that work;
* the whole request through the ASGI app with no socket (the app's lifespan loaded), and the floor
  app (``bench/floor_app.py``) the same way;
* what is left of the whole request after the stages: routing, middleware, admission, hand-offs.

Prints one JSON object (``digits_floor.py`` stores it in its results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def best_us(fn, n: int, rounds: int = 3) -> float:
    for _ in range(min(200, n)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return round(best, 1)


def scope(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"hey/0.0.1"),
                                         (b"content-type", b"image/png"),
                                         (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000), "state": {}}


async def asgi_us(app, path: str, body: bytes, n: int) -> float:
    """CPU microseconds per request through ``app`` (3 rounds of ``n``, the best)."""
    async def one() -> None:
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.get_running_loop().create_future()  # the client stays

        statuses = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope(path, body), receive, send)
        assert statuses == [200], statuses

    for _ in range(300):
        await one()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(n):
            await one()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return round(best, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    tree = args.tree.resolve()
    sys.path.insert(0, str(HERE))
    from bench.common import (
        mnist_digit_png,  # this checkout's benches; ``app`` from the tree
    )
    from bench.floor_app import app as floor

    sys.path.insert(0, str(tree))
    os.chdir(tree)
    tmp = Path(tempfile.mkdtemp(prefix="digits-stages-"))
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp / 'predictions.db'}"
    os.environ["LOG_LEVEL"] = "INFO"

    import logging

    import numpy as np

    from app.core.codecs.image import load_image, open_image
    from app.core.logging import configure_logging
    from app.monitoring.metrics import observe_request
    from app.monitoring.store import PredictionLog, create_schema
    from app.tasks.digits.preprocess import prepare_image, summary_features

    configure_logging("INFO")
    logging.getLogger().handlers[0].stream = open(tmp / "log.jsonl", "w")  # noqa: SIM115 (kept open)
    png = mnist_digit_png()
    n = args.requests
    formats = frozenset({"PNG"})
    stages: dict[str, float] = {}
    stages["decode"] = best_us(lambda: load_image(open_image(png, "image", max_pixels=10**8, formats=formats),
                                                  "image"), n)
    image = load_image(open_image(png, "image", max_pixels=10**8, formats=formats), "image")
    stages["preprocess"] = best_us(lambda: prepare_image(image, "image"), n)
    digit = prepare_image(image, "image")
    stages["features"] = best_us(lambda: summary_features(digit), n)

    from app.main import create_app

    app = create_app()
    async def measure() -> dict[str, float]:
        async with app.router.lifespan_context(app):
            model = app.state.registry.get("digits")
            batch = np.stack([digit.array])
            stages["inference"] = best_us(lambda: model.predict(batch), n)
            # The same call after the decode and preprocessing it follows in a request: the
            # difference is what their memory traffic costs the model (its weights leave the cache).
            in_sequence = best_us(lambda: model.predict(np.stack([prepare_image(load_image(open_image(
                png, "image", max_pixels=10**8, formats=formats), "image"), "image").array])), n)
            cache_penalty = round(in_sequence - stages["decode"] - stages["preprocess"] - stages["inference"], 1)
            import app.monitoring.store as store
            from sqlalchemy import create_engine

            # The engine the app makes (its JSON serializer) where the tree has make_engine.
            url = f"sqlite:///{tmp / 'stage-log.db'}"
            engine = store.make_engine(url) if hasattr(store, "make_engine") else create_engine(url)
            create_schema(engine)
            log = PredictionLog(engine)
            features = summary_features(digit)
            row = [{"prediction": "7", "confidence": 0.99, "features": features}]
            started = time.process_time()
            for i in range(n):
                log.enqueue(f"{i:032x}", "digits", model.version, row, 3.0)
            queued = time.process_time()
            log.flush(60)
            stages["log_row_queue"] = round((queued - started) / n * 1e6, 1)
            stages["log_row_write"] = round((time.process_time() - queued) / n * 1e6, 1)
            access = logging.getLogger("app.access")
            import app.core.logging as app_logging
            from app.core import pipeline

            # What the tree's request path calls: the direct access-log line and orjson answers
            # where the tree has them; otherwise logger.info and json.dumps.
            direct = getattr(app_logging, "info_with_fields", None)
            access_line = ((lambda extra: direct(access, "request", extra)) if direct is not None
                           else (lambda extra: access.info("request", extra=extra)))
            extra = {"request_id": "0" * 32, "correlation_id": None, "method": "POST", "client": "127.0.0.1",
                     "route": "/v1/digits/predict", "path": "/v1/digits/predict", "status": 200,
                     "latency_ms": 1.0, "request_bytes": len(png), "response_bytes": 300, "model": "digits",
                     "model_version": model.version, "error": None}
            stages["access_log_and_metrics"] = best_us(
                lambda: (access_line(extra),
                         observe_request("/v1/digits/predict", "POST", 200, "digits", 0.001)), n)
            body = {"model": "digits", "version": model.version, "request_id": "0" * 32,
                    "predictions": [{"label": "7", "digit": 7, "confidence": 0.99,
                                     "probabilities": {str(d): 0.001 for d in range(10)}}]}
            try:  # where the tree has it; older trees wrote answers with pipeline._json
                from app.core.jsonbody import strict_json as answer_json
            except ImportError:
                answer_json = pipeline._json
            stages["json_answer"] = best_us(lambda: answer_json(body), n)
            whole = await asgi_us(app, "/v1/digits/predict", png, n)
        floor_whole = await asgi_us(floor, "/predict", png, n)
        return {"request_in_process": whole, "floor_request_in_process": floor_whole,
                "inference_after_preprocessing_extra": cache_penalty}

    totals = asyncio.run(measure())
    accounted = sum(stages.values()) + totals["inference_after_preprocessing_extra"]
    result = {"tree": str(tree), "cpu_us": stages, **totals,
              "routing_middleware_admission_rest": round(totals["request_in_process"] - accounted, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
