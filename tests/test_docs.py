"""The documentation site builds, every strategy has a page and the CLI reference is current.

The site is built by mkdocs (Material) with ``--strict``: a broken link, a missing page or a
docstring mkdocstrings cannot render fails the build. Generated parts come from
``scripts/mkdocs_hooks.py`` (results, hyper-parameters) and ``scripts/cli_reference.py``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import yaml

from medcl.strategies import STRATEGIES

REPO = Path(__file__).parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    out: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_cli_reference_is_current():
    cli = _script("cli_reference")
    assert cli.TARGET.read_text() == cli.render(), (
        "docs/reference/cli.md is stale: the CLI changed. Regenerate it with "
        "`.venv/bin/python scripts/cli_reference.py` and commit the result."
    )


def test_cli_reference_covers_every_command():
    import typer

    from medcl.cli import app

    text = _script("cli_reference").render()
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        assert f"`medcl {name}`" in text
        for sub in getattr(cmd, "commands", {}):
            assert f"`medcl {name} {sub}`" in text
    assert "--resume-from" in text and "--data" in text  # options, not only command names


def test_every_registered_strategy_has_a_docs_page():
    nav = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    for name in STRATEGIES.list("*"):
        page = REPO / "docs" / "methods" / f"{name}.md"
        assert page.is_file(), f"strategy {name!r} has no page docs/methods/{name}.md"
        assert f"<!-- medcl:strategy {name} -->" in page.read_text(), (
            f"docs/methods/{name}.md must include its generated section "
            f"`<!-- medcl:strategy {name} -->`"
        )
        assert f"methods/{name}.md" in nav, f"docs/methods/{name}.md is not in mkdocs.yml nav"
    pages = {p.stem for p in (REPO / "docs" / "methods").glob("*.md")} - {"index"}
    assert pages == set(STRATEGIES.list("*")), "a method page without a registered strategy"


def test_results_marker_includes_the_file_or_says_it_is_missing(tmp_path, monkeypatch):
    hooks = _script("mkdocs_hooks")
    monkeypatch.setattr(hooks, "RESULTS", tmp_path)
    (tmp_path / "demo.md").write_text("# Demo\n\n| a |\n|---|\n| 0.123 |\n\n![fig](demo.png)\n")
    (tmp_path / "demo.png").write_bytes(b"\x89PNG")
    text = hooks._results("demo", "methods/x.md")
    assert "### Demo" in text and "| 0.123 |" in text  # demoted heading, the measured table
    assert "](../results/demo.png)" in text  # figure path relative to the page
    missing = hooks._results("not_measured", "methods/x.md")
    assert "No measured results yet" in missing and "not_measured.md" in missing


def test_getting_started_takes_the_readme_commands():
    from mkdocs.exceptions import PluginError

    hooks = _script("mkdocs_hooks")
    setup = hooks._readme_section("Set-up", "getting-started.md")
    readme = (REPO / "README.md").read_text()
    commands = [line.strip() for line in setup.splitlines() if ".venv/bin/" in line]
    assert len(commands) >= 2 and all(c in readme for c in commands)
    with pytest.raises(PluginError, match="no `## Nonexistent` section"):
        hooks._readme_section("Nonexistent", "getting-started.md")


def test_sphinx_roles_in_docstrings_render_as_code():
    hooks = _script("mkdocs_hooks")
    text = "see :class:<code>~medcl.reports.RunResults</code> and :func:<code>medcl.run</code>"
    out = hooks.on_page_content(text, None, None, None)
    assert out == "see <code>RunResults</code> and <code>medcl.run</code>"


def test_unknown_strategy_marker_stops_the_build():
    from mkdocs.exceptions import PluginError

    hooks = _script("mkdocs_hooks")
    with pytest.raises(PluginError, match="not a registered strategy"):
        hooks._strategy("ewk", "methods/ewk.md")


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    for name in STRATEGIES.list("*"):
        page = (site / "methods" / f"{name}.html").read_text()
        assert "Hyper-parameters" in page and "Measured results" in page, name
    sgm = (site / "methods" / "sgm.html").read_text()
    measured = (REPO / "benchmarks" / "results" / "stability_gap.md").read_text()
    first_row = next(line for line in measured.splitlines() if line.startswith("| vanilla"))
    assert first_row.split("|")[2].strip() in sgm  # a measured number, included not retyped
    for png in (REPO / "benchmarks" / "results").glob("*.png"):
        assert (site / "results" / png.name).is_file()
    assert (site / "reference" / "cli.html").is_file()
    page = re.sub(r"<[^>]+>", "", (site / "getting-started.html").read_text())  # code is tokenised
    setup = _script("mkdocs_hooks")._readme_section("Set-up", "getting-started.md")
    command = next(line.strip() for line in setup.splitlines() if "medcl run" in line)
    assert command in unescape(page)  # the README's own command, not a copy of it
