from __future__ import annotations

from tests.support import SHARED_DATA


def pytest_report_header(config) -> str:
    """Say where the real data sets are read from, and loudly when they are not there: the tests
    that use MNIST, the membrane slices, EmoDB or the Mall customers then fail on a missing file."""
    if SHARED_DATA.is_dir():
        return f"shared data: {SHARED_DATA}"
    return (f"shared data: {SHARED_DATA} IS MISSING: clone next to ../shared (the data sets are "
            "never copied into the repo); the tests that read them will fail")
