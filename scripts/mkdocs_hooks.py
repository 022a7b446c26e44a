"""mkdocs hooks: the parts of the medcl site that are generated, so they cannot go stale.

A page asks for generated content with an HTML comment (invisible when the Markdown is read
on its own):

``<!-- medcl:results NAME -->``
    ``benchmarks/results/NAME.md`` as the benchmark script wrote it (headings demoted, figures
    copied into the site), or, when the file does not exist yet, a note saying so and naming the
    script that writes it. Numbers are never retyped in a page.
``<!-- medcl:strategy NAME -->``
    the registered strategy ``NAME``: its hyper-parameters and defaults (from the constructor
    signature, as ``medcl strategies list`` prints them), then its module and class docstrings
    (paper, algorithm, deviations) rendered by mkdocstrings.
``<!-- medcl:strategies -->``
    a table of every registered strategy, its one-line summary and its page.
``<!-- medcl:all-results -->``
    every ``benchmarks/results/*.md``, in name order.
``<!-- medcl:readme HEADING -->``
    the section of the repository's ``README.md`` whose ``##`` heading starts with
    ``HEADING`` (e.g. the set-up commands), so the site and the README cannot disagree.

An unknown strategy name or a malformed marker stops the build with a message naming the page.
"""

from __future__ import annotations

import inspect
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS = REPO / "benchmarks"
_MARKER = re.compile(r"<!--\s*medcl:([a-z-]+)(?:\s+([A-Za-z0-9_.-]+))?\s*-->")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,5}) ", re.MULTILINE)
# Sphinx cross-reference roles in docstrings (":class:`~medcl.x.Y`"), rendered as plain code.
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):(<code>)(~)?([^<]*)")


def on_files(files, config):
    """Copy the benchmark figures into the site under ``results/``."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Expand every ``<!-- medcl:... -->`` marker of the page."""

    def expand(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        where = page.file.src_uri
        if kind == "results":
            return _results(_need(arg, kind, where), where)
        if kind == "strategy":
            return _strategy(_need(arg, kind, where), where)
        if kind == "strategies":
            return _strategy_table(where)
        if kind == "readme":
            return _readme_section(_need(arg, kind, where), where)
        if kind == "all-results":
            names = sorted(p.stem for p in RESULTS.glob("*.md"))
            return "\n\n".join(_results(n, where, level=2) for n in names)
        raise PluginError(
            f"{where}: unknown marker `medcl:{kind}`; use one of results, strategy, "
            "strategies, all-results, readme."
        )

    return _MARKER.sub(expand, markdown)


def _readme_section(heading: str, where: str) -> str:
    """The body of README.md's ``## <heading>...`` section (without its heading line)."""
    sections = re.split(r"^## ", (REPO / "README.md").read_text(), flags=re.MULTILINE)[1:]
    for section in sections:
        title, _, body = section.partition("\n")
        if title.startswith(heading):
            return body.strip() + "\n"
    titles = [s.partition("\n")[0] for s in sections]
    raise PluginError(f"{where}: README.md has no `## {heading}` section; it has {titles}.")


def on_page_content(html, page, config, files):
    """Docstrings use Sphinx roles; show ``:class:`~a.b.C``` as the code span ``C``."""
    return _ROLE.sub(
        lambda m: m.group(1) + (m.group(3).rsplit(".", 1)[-1] if m.group(2) else m.group(3)), html
    )


def _need(arg: str | None, kind: str, where: str) -> str:
    if not arg:
        raise PluginError(f"{where}: `<!-- medcl:{kind} NAME -->` needs a NAME.")
    return arg


def _results(name: str, where: str, *, level: int = 3) -> str:
    """A results file as Markdown for the page ``where``, or a note that it is missing."""
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        script = BENCHMARKS / f"{name}.py"
        how = (
            f"run `python benchmarks/{script.name}` to measure them"
            if script.is_file()
            else "the benchmark that writes it has not been added yet"
        )
        return (
            f'!!! note "No measured results yet"\n'
            f"    `benchmarks/results/{name}.md` does not exist in this version of medcl; {how}. "
            f"This page shows measured numbers only, never typed-in ones.\n"
        )
    text = path.read_text()
    shift = "#" * (level - 1)
    text = _HEADING.sub(lambda m: f"{shift}{m.group(1)} ", text)
    base = posixpath.dirname(where)

    def image(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or not (RESULTS / target).is_file():
            return m.group(0)
        return f"![{m.group(1)}]({posixpath.relpath(f'results/{target}', base or '.')})"

    text = _IMAGE.sub(image, text)
    return (
        f"{text.rstrip()}\n\n*Source: `benchmarks/results/{name}.md`, written by the benchmark.*\n"
    )


def _strategy(name: str, where: str) -> str:
    from medcl.strategies import STRATEGIES
    from medcl.strategies.base import strategy_params

    if name not in STRATEGIES.list("*"):
        raise PluginError(
            f"{where}: `medcl:strategy {name}` is not a registered strategy; registered: "
            f"{', '.join(STRATEGIES.list('*'))}."
        )
    cls = STRATEGIES.get(name)
    sig = inspect.signature(cls.__init__).parameters
    rows = [
        f"| `{k}` | `{v!r}` | `{_annotation(sig[k])}` |" for k, v in strategy_params(name).items()
    ]
    table = (
        "| hyper-parameter | default | type |\n|---|---|---|\n" + "\n".join(rows)
        if rows
        else "This strategy has no hyper-parameters of its own."
    )
    config = f"```yaml\nstrategy: {{name: {name}}}\n```"
    module = cls.__module__
    return (
        f"## Use it\n\n{config}\n\n"
        f"## Hyper-parameters\n\nKeyword arguments of `{cls.__name__}`, set under `strategy:` "
        f"in a config (generated from the constructor, like `medcl strategies list`).\n\n"
        f"{table}\n\n"
        f"## Paper, algorithm and deviations\n\nFrom the docstrings of `{module}`:\n\n"
        f"::: {module}\n    options:\n      show_root_heading: false\n      members: false\n\n"
        f"::: {module}.{cls.__name__}\n    options:\n      show_root_heading: true\n"
        f"      heading_level: 3\n      members: false\n      show_bases: false\n"
    )


def _annotation(param: inspect.Parameter) -> str:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return ""
    return (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))).replace("|", "\\|")


def _strategy_table(where: str) -> str:
    from medcl.strategies import STRATEGIES

    base = posixpath.dirname(where)
    rows = []
    for name in STRATEGIES.list("*"):
        doc = (STRATEGIES.get(name).__doc__ or "").strip().splitlines()
        summary = doc[0].replace("|", "\\|") if doc else ""
        link = posixpath.relpath(f"methods/{name}.md", base or ".")
        rows.append(f"| [`{name}`]({link}) | {summary} |")
    return "| strategy | summary |\n|---|---|\n" + "\n".join(rows) + "\n"
