"""Observers: each registered method is called with what the core did; one that raises is logged
and skipped, and neither fails the caller nor stops the other observers."""

from __future__ import annotations

import logging

from app.core.events import Observers


class Counting:
    def __init__(self, keeps: int = 0) -> None:
        self.seen: list[tuple] = []
        self.keeps = keeps

    def on_request_done(self, *args):
        self.seen.append(("request", *args))

    def on_predictions(self, *args):
        self.seen.append(("predictions", args[0]))
        return self.keeps


class Broken:
    def on_request_done(self, *args):
        raise RuntimeError("metrics backend down")

    def on_predictions(self, *args):
        raise RuntimeError("log down")


def test_every_observer_is_told_and_a_broken_one_is_logged_and_skipped(caplog):
    first, second = Counting(), Counting(keeps=2)
    observers = Observers()
    for observer in (first, Broken(), second):
        observers.add(observer)
    with caplog.at_level(logging.ERROR, logger="app.events"):
        observers.request_done("/v1/digits/predict", "POST", 200, "digits", 0.01)
        kept = observers.predictions("req-1", "digits", "1.0.1", [{}], 1.0, [b"x"])
    assert first.seen == second.seen == [("request", "/v1/digits/predict", "POST", 200, "digits", 0.01),
                                         ("predictions", "req-1")]
    assert kept == 2  # the most any observer keeps
    assert [r.event for r in caplog.records] == ["on_request_done", "on_predictions"]


def test_an_observer_is_called_only_for_the_events_it_implements():
    observers = Observers()
    observers.add(object())
    observers.shadow("req", "digits", "1.0.0", [], 1.0)  # nobody listens: nothing happens
    assert observers.predictions("req", "digits", "1.0.1", [], 1.0, None) == 0
