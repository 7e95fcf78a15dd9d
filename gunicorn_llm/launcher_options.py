"""The launcher's options, its --help and the docs' option tables, all rendered from the settings' declarations.

Each setting is declared once, in gunicorn_llm/settings.py (as gunicorn's own `Setting` classes drive its command
line, its checks and its docs). From them:

- `python -m gunicorn_llm.launcher_options shell PROG` prints shell code that start_gunicorn.sh evals: getopt's long
  option list, the map from each spelling of an option to its environment variable, the switches (options without
  a value) and the usage text;
- `python -m gunicorn_llm.launcher_options docs` rewrites the option tables between their markers in README.md and
  docs/*.md; tests/test_launcher_options.py fails when a table differs from what the settings render.
"""

from __future__ import annotations

import argparse
import re
import shlex
import textwrap
from pathlib import Path

from gunicorn_llm.settings import Declared, declared_settings

ROOT = Path(__file__).resolve().parents[1]
HELP_FLAGS = ("-h", "--help")  # the launcher's own option: prints the usage text and exits
OPTION_COLUMN = 29  # where --help's descriptions start
HELP_WIDTH = 48  # --help's descriptions wrap here; the variable and its default follow the last line
# A table in the docs: its first marker names the section of settings it shows; what lies between is replaced.
TABLE = re.compile(r"(?P<begin><!-- settings table \"(?P<section>\w+)\": [^\n]*-->\n)(?P<table>.*?)"
                   r"(?P<end><!-- end of settings table -->)", re.DOTALL)


def options() -> list[Declared]:
    """The settings that have a launcher option."""
    return [setting for setting in declared_settings() if setting.flag]


def shell_value(value: object) -> str:
    """A default as the environment variable would say it."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def getopt_long_options() -> str:
    """getopt's --longoptions: every spelling of every option, `:` after those that take a value."""
    names = [flag + ("" if setting.switch else ":") for setting in options() for flag in setting.flags]
    return ",".join(name.removeprefix("--") for name in [HELP_FLAGS[1], *names])


def usage_text(prog: str) -> str:
    """The launcher's --help."""
    lines = [f"Usage: {prog} [options]", "",
             "Serve a language model on every GPU of this machine (or on CPU without one): POST /infer.", ""]
    for setting in options():
        left = f"  {setting.flag}" if setting.switch else f"  {setting.flag} {setting.meta}"
        shown = setting.default is not None and setting.default is not False
        variable = f"[{setting.env}={shell_value(setting.default)}]" if shown else f"[{setting.env}]"
        described = textwrap.wrap(setting.help, HELP_WIDTH)
        described[-1] = f"{described[-1]:<{HELP_WIDTH + 1}}{variable}"
        for number, line in enumerate(described):
            lines.append(f"{left if number == 0 else '':<{OPTION_COLUMN - 1}} {line}".rstrip())
    lines.append(f"{'  ' + ', '.join(HELP_FLAGS):<{OPTION_COLUMN - 1}} this help")
    aliases = "; ".join(f"{', '.join(setting.aliases)} for {setting.flag}" for setting in options() if setting.aliases)
    lines += [""] + textwrap.wrap(f"Also accepted: {aliases}.", 116)
    lines += textwrap.wrap("Every option also has the environment variable in brackets (with its default); an option "
                           "wins over its variable.", 116)
    return "\n".join(lines)


def shell_spec(prog: str) -> str:
    """Shell code for start_gunicorn.sh to eval: long_options, option_variable, option_is_switch and usage_text."""
    variables = " ".join(f"[{shlex.quote(flag)}]={setting.env}" for setting in options() for flag in setting.flags)
    switches = " ".join(f"[{shlex.quote(flag)}]=1" for setting in options() if setting.switch for flag in setting.flags)
    return "\n".join([
        f"long_options={shlex.quote(getopt_long_options())}",
        f"declare -A option_variable=({variables})",
        f"declare -A option_is_switch=({switches})",
        f"usage_text={shlex.quote(usage_text(prog))}",
    ])


def docs_default(setting: Declared) -> str:
    """A default as the docs' tables say it."""
    if setting.shown_default is not None:
        return setting.shown_default
    if setting.default is None:
        return "none"
    if isinstance(setting.default, bool):
        return "on" if setting.default else "off"
    if isinstance(setting.default, str):
        return f"`{setting.default}`"
    return shell_value(setting.default)


def markdown_table(section: str) -> str:
    """The docs' table of one section's settings; the options' tables end with the launcher's own --help."""
    settings = [setting for setting in declared_settings() if setting.section == section]
    with_options = any(setting.flag for setting in settings)
    header = ["option"] * with_options + ["variable", "default", "meaning"]
    rows = []
    for setting in settings:
        cells = [", ".join(f"`{flag}`" for flag in setting.flags)] * with_options
        rows.append(cells + [f"`{setting.env}`", docs_default(setting), setting.doc])
    if section == "server":
        rows.append([", ".join(f"`{flag}`" for flag in HELP_FLAGS), "", "", "this help"])
    lines = [header, ["---"] * len(header)] + rows
    return "".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |\n" for line in lines)


def refresh_tables(text: str) -> str:
    """TEXT with every marked settings table rendered afresh from the settings."""
    return TABLE.sub(lambda match: match["begin"] + markdown_table(match["section"]) + match["end"], text)


def documented_sections(text: str) -> list[str]:
    return [match["section"] for match in TABLE.finditer(text)]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def write_docs() -> list[Path]:
    """Rewrites the tables of every markdown file that holds one; returns the files that changed."""
    changed = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        if (fresh := refresh_tables(text)) != text:
            path.write_text(fresh, encoding="utf-8")
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gunicorn_llm.launcher_options", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shell = commands.add_parser("shell", help="shell code for start_gunicorn.sh to eval")
    shell.add_argument("prog", help="the launcher's name, for its usage text")
    commands.add_parser("docs", help="rewrite the option tables in README.md and docs/*.md")
    arguments = parser.parse_args()
    if arguments.command == "shell":
        print(shell_spec(arguments.prog))
    else:
        for path in write_docs():
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
