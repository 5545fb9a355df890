"""MkDocs hooks: pages generated from the code, and files from outside ``docs/``.

* ``<!-- generated: config -->`` becomes the run-config schema (:mod:`equijax.config`);
* ``<!-- generated: cli -->`` becomes every command's ``--help`` (:func:`equijax.cli.parser`);
* the figures of ``experiments/results/`` become ``assets/results/``.

(The tutorials, ``docs/tutorials/*.ipynb``, are links to the notebooks of ``notebooks/``, which
mkdocs-jupyter renders with the outputs stored in them.)

So the reference cannot drift from the code: it is the code, read at build time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for figure in sorted((ROOT / "experiments" / "results").rglob("*.png")):
        rel = figure.relative_to(ROOT / "experiments" / "results").as_posix()
        files.append(_file(figure, "assets/results/" + rel, config))
    return files


def _file(path: Path, dest: str, config) -> File:
    return File.generated(config, dest, abs_src_path=str(path))


def on_page_markdown(markdown: str, page, config, files):
    if "<!-- generated: config -->" in markdown:
        markdown = markdown.replace("<!-- generated: config -->", _config_reference())
    if "<!-- generated: cli -->" in markdown:
        markdown = markdown.replace("<!-- generated: cli -->", _cli_reference())
    return markdown


def _config_reference() -> str:
    from equijax import config

    lines = []

    def walk(schema, prefix=""):
        rows = []
        for key, spec in schema.items():
            if isinstance(spec, dict):
                walk(spec, prefix + key + ".")
                continue
            default = "null" if spec.default is None else spec.default
            kind = config._type_name(spec.type) + (", or null" if spec.optional else "")
            rows.append(f"| `{prefix}{key}` | `{default}` | {spec.unit or ''} | {kind} | {spec.doc} |")
        if rows:
            lines.append(f"\n### `{prefix.rstrip('.') or 'top level'}`\n")
            lines.append("| key | default | unit | type | meaning |\n|---|---|---|---|---|")
            lines.extend(rows)

    walk(config.SCHEMA)
    return "\n".join(lines) + "\n"


def _cli_reference() -> str:
    from equijax import cli

    parser = cli.parser()
    out = ["```text", parser.format_help().rstrip(), "```"]
    for action in parser._subparsers._group_actions:  # argparse keeps its subcommands here
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            out += [f"\n## `equijax {name}`\n", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"
