"""The docs' option tables are what the settings render (gunicorn_llm/launcher_options.py), and the declarations
they come from are sound. Fast: no process. That the launcher's options reach their variables is tests/test_launcher.py.
"""

from __future__ import annotations

import pytest

from gunicorn_llm.launcher_options import documented_sections, markdown_files, markdown_table, refresh_tables
from gunicorn_llm.settings import declared_settings

pytestmark = pytest.mark.inprocess

REGENERATE = "python -m gunicorn_llm.launcher_options docs"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: path.name)
def test_option_tables_are_the_settings_rendered(path):
    text = path.read_text(encoding="utf-8")
    assert refresh_tables(text) == text, f"{path.name}'s option tables differ from the settings: run {REGENERATE}"


def test_every_section_of_settings_has_one_table():
    documented = [section for path in markdown_files() for section in documented_sections(path.read_text())]
    declared = {setting.section for setting in declared_settings() if setting.section}
    assert sorted(documented) == sorted(declared)


def test_a_stale_table_is_caught():
    table = markdown_table("server")
    stale = table.replace("| 5002 |", "| 5003 |")
    assert stale != table
    text = f'intro\n<!-- settings table "server": generated -->\n{stale}<!-- end of settings table -->\noutro\n'
    assert refresh_tables(text) == text.replace(stale, table)


def test_every_option_spelling_belongs_to_one_setting():
    flags = [flag for setting in declared_settings() for flag in setting.flags]
    assert len(flags) == len(set(flags))
    assert all(flag.startswith("--") and " " not in flag for flag in flags)


def test_every_setting_says_what_it_is():
    for setting in declared_settings():
        assert setting.help and setting.doc, setting.env
        assert setting.section or not setting.flag, f"{setting.env} has an option but no docs table"
