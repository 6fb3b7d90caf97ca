"""The web page is composed from the tasks' panels: one section per task that has one, in order."""

from __future__ import annotations

import re
from types import SimpleNamespace

from app.web.router import compose_page


def test_each_task_with_a_panel_gets_its_section_in_order_and_one_without_gets_none(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "panel.html").write_text(f'<h2 id="{name}-title">{name.upper()}</h2>\n<p>{name} body</p>\n')
    tasks = [SimpleNamespace(name="b", web=tmp_path / "b"), SimpleNamespace(name="none", web=None),
             SimpleNamespace(name="a", web=tmp_path / "a")]
    page = compose_page(tasks).decode()
    sections = re.findall(r'<section aria-labelledby="(\w+)-title" class="panel" data-module="([^"]+)">\n'
                          r'\s+<h2 id="\1-title">', page)
    assert sections == [("b", "/static/tasks/b/panel.js"), ("a", "/static/tasks/a/panel.js")]
    assert "<p>b body</p>" in page and "none" not in page
    assert "<!-- panels -->" not in page and page.count("<main>") == 1
