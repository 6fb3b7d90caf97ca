"""Attacks on the real server, measured: for each, the worker's peak RSS growth over its idle value
and what an honest client (another address, light requests every 50 ms) got meanwhile. Writes
bench/results/abuse.json (or abuse-<label>.json).

    python -m bench.abuse [--checkout PATH --label before]

``--checkout`` serves another checkout of the project (e.g. an older commit in a git worktree) with
this one's attacks, to compare.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.attacks import (
    HonestClient,
    Trickle,
    closed_by_peer,
    host_port,
    open_sockets,
    post_many,
    request_head,
)
from bench.common import cpu_model, mnist_digit_png, write_results
from bench.hostile_inputs import padded_png
from bench.liveserver import REPO_ROOT, MemorySampler, running_server


def honest_figures(honest: HonestClient) -> dict[str, Any]:
    return {"honest_requests": len(honest.latencies_s), "honest_failed": len(honest.failures),
            "honest_p99_s": round(honest.p99_s, 3) if honest.latencies_s else None}


def forged_identities(checkout: Path) -> dict[str, Any]:
    """12 000 requests, each claiming a new 14 KB client address left of the proxy's entry."""
    env = {"FORWARDED_ALLOW_IPS": "*", "RATE_LIMIT": "5/minute"}
    with running_server(workers=1, env=env, cwd=checkout) as live:
        def attack(start: int) -> None:
            with httpx.Client(base_url=live.base_url, timeout=30) as client:
                for i in range(start, 12_000, 4):
                    client.post("/v1/digits/predict", content=b"x", headers={
                        "Content-Type": "text/plain",
                        "X-Forwarded-For": f"{i}{'f' * 14_000}, 203.0.{i // 250 % 250}.{i % 250 + 1}"})

        with MemorySampler(live) as memory, concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(attack, range(4)))
        spoofed = [httpx.post(live.base_url + "/v1/clustering/predict", headers={
            "X-Forwarded-For": f"10.{i}.0.1, 203.0.113.50"},
            json={"instances": [{"annual_income": 60, "spending_score": 50}]}).status_code for i in range(8)]
        return {"worker_growth_mib": round(memory.peak_growth_mib, 1),
                "eight_spoofed_requests_at_5_per_minute": spoofed}


def shadow_queue(checkout: Path) -> dict[str, Any]:
    """200 uploads of a 9.9 MB digit from 8 clients, a shadow version set."""
    big = padded_png(mnist_digit_png(), 9_900_000)
    with running_server(workers=1, env={"SHADOW_VERSIONS": '{"digits": "1.0.0"}'}, cwd=checkout) as live:
        with MemorySampler(live) as memory, HonestClient(live.base_url) as honest:
            statuses = post_many(live.base_url, "/v1/digits/predict", big, "image/png", 200, 8)
        return {"worker_growth_mib": round(memory.peak_growth_mib, 1),
                "answered_200": statuses.count(200), "answered_503": statuses.count(503),
                **honest_figures(honest)}


def json_bombs(checkout: Path) -> dict[str, Any]:
    """Two workers: 12 V2 bodies of 8 MB of [0],[0],... and 6 v1 bodies of 4 000 digit instances."""
    head = b'{"inputs":[{"name":"pixels","shape":[1,28,28],"datatype":"FP32","data":['
    v2 = head + b"[0]," * ((8_000_000 - len(head) - 7) // 4) + b"[0]]}]}"
    pixels = "[" + ",".join(["[" + ",".join(["0"] * 28) + "]"] * 28) + "]"
    v1 = ('{"instances":[' + ",".join([f'{{"pixels":{pixels}}}'] * 4000) + "]}").encode()
    bombs = ([("/v2/models/digits/infer", v2)] * 4 + [("/v1/digits/predict", v1)] * 2) * 3
    with running_server(workers=2, cwd=checkout) as live:
        def post(item: tuple[str, bytes]) -> int | str:
            try:
                return httpx.post(live.base_url + item[0], content=item[1], timeout=60,
                                  headers={"Content-Type": "application/json"}).status_code
            except httpx.TransportError as exc:
                return type(exc).__name__

        with MemorySampler(live, pss=True) as memory, HonestClient(live.base_url) as honest:
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                statuses = sorted(set(map(str, pool.map(post, bombs))))
            time.sleep(1.0)
        return {"worker_growth_mib": round(memory.peak_growth_mib, 1), "peak_pss_mib": round(memory.peak_pss, 1),
                "statuses": statuses, **honest_figures(honest)}


def trickled_uploads(checkout: Path) -> dict[str, Any]:
    """40 connections trickling a digit upload and 9 a segmentation, a byte per 2 s, for 5 s."""
    with running_server(workers=1, cwd=checkout) as live:
        with Trickle(live.base_url, "/v1/digits/predict", 40, address="203.0.113.66") as digits, \
                Trickle(live.base_url, "/v1/segmentation/predict", 9, address="203.0.113.67"), \
                HonestClient(live.base_url) as honest:
            time.sleep(5.0)
            refused = sum(line.startswith(b"HTTP/1.1 429") for line in digits.answered())
        return {"trickles_told_429_at_once": refused, **honest_figures(honest)}


def idle_connections(checkout: Path) -> dict[str, Any]:
    """500 connections that send nothing: how long until the server has closed them all."""
    with running_server(workers=1, cwd=checkout) as live:
        with open_sockets(live.base_url, 500) as idle, HonestClient(live.base_url) as honest:
            opened, closed_after = time.monotonic(), None
            while time.monotonic() - opened < 30:
                if all(closed_by_peer(s) for s in idle):
                    closed_after = round(time.monotonic() - opened, 1)
                    break
                time.sleep(0.5)
        return {"all_closed_after_s": closed_after, "waited_s": 30, **honest_figures(honest)}


def unread_long_ids(checkout: Path) -> dict[str, Any]:
    """66 clients send a V2 request with a 6 MB id and never read the answer."""
    stroke = [1.0 if 12 <= i % 28 <= 15 and 5 <= i // 28 <= 22 else 0.0 for i in range(784)]
    body = json.dumps({"id": "x" * 6_000_000, "inputs": [
        {"name": "pixels", "shape": [1, 28, 28], "datatype": "FP32", "data": stroke}]}).encode()
    with running_server(workers=1, cwd=checkout) as live:
        head = request_head("/v2/models/digits/infer", host_port(live.base_url)[0], {
            "Content-Type": "application/json", "Content-Length": str(len(body))})
        sockets = []
        with MemorySampler(live) as memory:
            for _ in range(66):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(host_port(live.base_url))
                s.sendall(head + body)
                sockets.append(s)
            time.sleep(10.0)
        first = sockets[0].recv(64).split(b"\r\n", 1)[0].decode()
        for s in sockets:
            s.close()
        return {"worker_growth_mib": round(memory.peak_growth_mib, 1), "first_answer": first}


def forged_request_ids(checkout: Path) -> dict[str, Any]:
    """24 clients post feedback for made-up ids shaped like fresh ones, for 5 s, on two workers."""
    with running_server(workers=2, cwd=checkout) as live:
        stop, times = threading.Event(), []

        def forge() -> None:
            with httpx.Client(base_url=live.base_url, timeout=30) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    client.post("/v1/feedback", json={
                        "request_id": f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}", "label": "7"})
                    times.append(time.perf_counter() - started)

        threads = [threading.Thread(target=forge, daemon=True) for _ in range(24)]
        for t in threads:
            t.start()
        statuses = []
        with httpx.Client(base_url=live.base_url, timeout=30) as client:
            for _ in range(10):
                made = client.post("/v1/digits/predict", content=mnist_digit_png(),
                                   headers={"Content-Type": "image/png"}).json()
                statuses.append(client.post("/v1/feedback", json={
                    "request_id": made["request_id"], "label": "7"}).status_code)
            time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        times.sort()
        return {"forged_answered": len(times), "forged_p50_s": round(times[len(times) // 2], 3),
                "forged_max_s": round(times[-1], 3), "real_feedback_statuses": statuses}


CASES = {"forged client identities (rate limiter)": forged_identities, "shadow queue": shadow_queue,
         "JSON bombs": json_bombs, "trickled uploads": trickled_uploads, "idle connections": idle_connections,
         "unread answers to 6 MB ids": unread_long_ids, "forged fresh request ids": forged_request_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": platform.machine(), "cpu": cpu_model(),
                               "checkout": str(args.checkout), "cases": {}}
    for name, case in CASES.items():
        try:
            results["cases"][name] = case(args.checkout)
        except Exception as exc:  # an attack that breaks the server is a result too
            results["cases"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"{name}: {results['cases'][name]}", flush=True)
    write_results(f"abuse-{args.label}" if args.label else "abuse", results)


if __name__ == "__main__":
    main()
