"""``medcl datasets`` / ``scenarios`` / ``strategies``: what data and methods medcl has."""

from __future__ import annotations

__all__ = ["datasets_check", "scenarios_list", "scenarios_show", "strategies_list"]

from pathlib import Path
from typing import Annotated

import typer

from medcl.cli.common import Root, console


def datasets_check(root: Root = None) -> None:
    """Verify the MedMNIST files in the data root (MD5 against medmnist.INFO); exit 2 if one fails."""
    import os

    from rich.table import Table

    from medcl.data.medmnist_source import ENV_VAR, check_medmnist, resolve_data_root
    from medcl.errors import DataError

    folder = resolve_data_root(root)
    how = (
        "--root"
        if root is not None
        else f"${ENV_VAR}"
        if os.environ.get(ENV_VAR)
        else "medmnist default"
    )
    df = check_medmnist(root)
    out = console()
    out.print(f"data root: {folder} (from {how})")
    if df.empty:
        out.print(
            f"no MedMNIST files found in {folder}. Put the .npz files there, point ${ENV_VAR} or "
            "--root at the folder that holds them, or load with download: true."
        )
        return
    table = Table("dataset", "size", "file", "dims", "task", "classes", "train / val / test", "MD5")
    for r in df.itertuples():
        table.add_row(
            r.flag,
            str(r.size),
            Path(r.file).name,
            r.dims,
            r.task,
            str(r.n_classes),
            f"{r.n_train} / {r.n_val} / {r.n_test}",
            "[green]verified[/]" if r.verified else f"[red]{r.md5_ok}[/]",
        )
    out.print(table)
    bad = df[~df["verified"].astype(bool)]
    if len(bad):  # a MedclError: main() prints it and exits 2
        raise DataError(
            f"{len(bad)} of {len(df)} MedMNIST file(s) failed MD5 verification: "
            + "; ".join(f"{f} ({why})" for f, why in zip(bad["file"], bad["md5_ok"], strict=True))
            + ". Delete them and download again (download: true) or replace them with the official files."
        )
    out.print(f"{len(df)} file(s) present, all verified.")


def scenarios_list(
    pattern: Annotated[str, typer.Argument(help="Glob over names, e.g. '*sites*'.")] = "*",
) -> None:
    """List registered scenarios with a one-line description."""
    from rich.table import Table

    from medcl.data.scenarios import list_scenarios, scenario_description

    table = Table("scenario", "description")
    for name in list_scenarios(pattern):
        table.add_row(name, scenario_description(name))
    console().print(table)


def _parse_params(items: list[str]) -> dict[str, object]:
    """``["order=[0,1,2]", "n_sites=3"]`` -> ``{"order": [0, 1, 2], "n_sites": 3}`` (YAML values)."""
    import yaml

    from medcl.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param must look like KEY=VALUE (e.g. n_sites=3); got {item!r}.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--param {key}: the value {value!r} is not valid YAML "
                f"({getattr(e, 'problem', None) or e}); quote it, e.g. --param '{key}=\"{value}\"'."
            ) from None
    return out


def scenarios_show(
    name: Annotated[str, typer.Argument(help="Registered scenario (see `medcl scenarios list`).")],
    root: Root = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed fixing orders, sites and shifts.")] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Scenario parameter KEY=VALUE (YAML value), repeatable."
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch missing MedMNIST files.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Build a scenario and describe its experiences: classes, class names, site, split sizes."""
    import json

    from rich.table import Table

    from medcl.data.scenarios import build_scenario

    scenario = build_scenario(
        name, root=root, download=download, seed=seed, **_parse_params(param or [])
    )
    if as_json:
        typer.echo(json.dumps(scenario.describe() | {"sources": list(scenario.sources)}, indent=2))
        return
    out = console()
    out.print(
        f"[bold]{scenario.name}[/] (kind {scenario.kind}, seed {scenario.seed}): "
        f"{len(scenario)} experiences, {scenario.num_classes} classes, input "
        f"{tuple(scenario.input_shape)}"
    )
    table = Table(
        "#", "experience", "site", "task", "classes", "class names", "train", "val", "test"
    )
    for e in scenario:
        table.add_row(
            str(e.index),
            e.name,
            e.site,
            str(e.task_id),
            ", ".join(map(str, e.classes)),
            "; ".join(scenario.class_names[c] for c in e.classes),
            str(len(e.train)),
            str(len(e.val)),
            str(len(e.test)),
        )
    out.print(table)
    for src in scenario.sources:
        out.print(f"source {src.get('dataset', '?')}: licence {src.get('licence', 'unknown')}")
        for site in filter(None, src.get("sites", "").split("; ")):
            out.print(f"  simulated {site}")


def strategies_list(
    pattern: Annotated[str, typer.Argument(help="glob, e.g. '*replay*'")] = "*",
) -> None:
    """List registered strategies with their hyper-parameters and defaults."""
    from medcl.strategies import STRATEGIES
    from medcl.strategies.base import strategy_params

    for name in STRATEGIES.list(pattern):
        cls = STRATEGIES.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        params = ", ".join(f"{k}={v!r}" for k, v in strategy_params(name).items())
        typer.echo(f"{name:<12} {doc}")
        if params:
            typer.echo(f"{'':<12} options: {params}")
