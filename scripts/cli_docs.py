"""docs/cli.md's reference part, written from the Click definitions in cli.py, so the page cannot drift.

    python scripts/cli_docs.py          # rewrites the part of docs/cli.md between the markers
    python scripts/cli_docs.py --check  # exit 1 where the page differs from cli.py (the tests do this)
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "cli.md"
BEGIN = "<!-- reference: written by scripts/cli_docs.py from cli.py; edit cli.py, then run it -->"
END = "<!-- end of reference -->"
ORDER = ("train", "sweep", "eval", "infer", "convert")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def command_reference(name: str, command: click.Command) -> list[str]:
    context = click.Context(command, info_name=f"python cli.py {name}")
    lines = [f"### `{name}`", "", "```", command.get_usage(context).removeprefix("Usage: "), "```", "",
             inspect.cleandoc(command.help or ""), "", "| option | what it does |", "|---|---|"]
    for param in command.get_params(context):
        record = param.get_help_record(context)
        if record is None:  # an argument: Click lists no help for them
            record = (param.human_readable_name, "(argument)")
        lines.append(f"| `{cell(record[0])}` | {cell(record[1])} |")
    return lines + [""]


def render() -> str:
    from cli import cli

    lines = [BEGIN, ""]
    for name in ORDER:
        lines += command_reference(name, cli.commands[name])
    missing = set(cli.commands) - set(ORDER)
    if missing:
        raise SystemExit(f"commands not in the reference: {sorted(missing)}; add them to ORDER")
    return "\n".join(lines + [END])


def page_with(reference: str, page: str) -> str:
    before, _, rest = page.partition(BEGIN)
    _, _, after = rest.partition(END)
    return before + reference + after


def main() -> None:
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE} has no reference markers")
    wanted = page_with(render(), page)
    if "--check" in sys.argv:
        if wanted != page:
            raise SystemExit(f"{PAGE} differs from cli.py: run python scripts/cli_docs.py")
        return
    PAGE.write_text(wanted)


if __name__ == "__main__":
    main()
