"""The reference web client: one page at ``/`` (static ES modules, no build step, no CDN) that uses
every task through the public API, served with a Content-Security-Policy that allows nothing inline
and nothing from another origin. The page is composed once, when the app is made, from the panel
each task declares (``Task.web``: ``panel.html``, the inside of its section, and ``panel.js``, an
ES module exporting ``setup(section)``); a task with no panel is listed but has no section."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
STATIC = HERE / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
           "Permissions-Policy": "microphone=(self), camera=()"}
PANELS = "<!-- panels -->"


def panel_url(name: str) -> str:
    return f"/static/tasks/{name}"


def compose_page(tasks: Iterable[Any]) -> bytes:
    """``page.html`` with one ``<section>`` per task that has a panel, in the tasks' order."""
    sections = []
    for task in tasks:
        if task.web is None:
            continue
        name = html.escape(task.name, quote=True)
        inner = (Path(task.web) / "panel.html").read_text(encoding="utf-8")
        body = "".join(f"      {line}\n" if line.strip() else "\n" for line in inner.splitlines())
        sections.append(f'    <section aria-labelledby="{name}-title" class="panel" '
                        f'data-module="{panel_url(name)}/panel.js">\n{body}    </section>\n')
    page = (HERE / "page.html").read_text(encoding="utf-8")
    return page.replace(PANELS + "\n", "".join(sections), 1).encode()


def add_web(app: FastAPI, tasks: list[Any]) -> None:
    """The page at ``/``, the shared assets at ``/static`` and each task's panel files."""
    page = compose_page(tasks)
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> Response:
        return Response(page, media_type="text/html", headers=HEADERS)

    app.include_router(router)
    for task in tasks:  # before /static, which would otherwise take these paths
        if task.web is not None:
            app.mount(panel_url(task.name), StaticFiles(directory=task.web), name=f"panel-{task.name}")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
