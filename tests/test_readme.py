"""The README's config-group tables list exactly the options in conf/: one row per option, none missing,
none that no longer exists.

Checked tables (a table is found by its header's first cells):
- ``| group | option | ... |`` (Config groups): every group of conf/ but Hydra's own (``hydra``) and
  ``paths``, one row per ``(group, option)``;
- ``| <group> | ... |`` (``| defense | ...``, ``| attack | ...``): the options of that group;
- ``| pipeline experiment | ... |``: the experiments of ``pipeline.py`` (those with a ``point``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml
from conftest import CONF_DIR, ROOT

README = ROOT / "README.md"
NOT_LISTED = {"hydra", "paths"}  # Hydra's run folders and our output paths: not a user's choice


@dataclass
class Table:
    line: int  # 1-based line of the header
    header: list[str]
    rows: list[tuple[int, list[str]]] = field(default_factory=list)  # (line, cells)

    def title(self) -> str:
        return f"README.md table '| {' | '.join(self.header)} |' (line {self.line})"


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is a literal bar, not a separator)."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [cell.strip() for cell in cells[1:-1]]


def markdown_tables(text: str) -> list[Table]:
    tables: list[Table] = []
    current: Table | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("|"):
            current = None
            continue
        cells = split_row(line)
        if current is None:
            current = Table(number, cells)
            tables.append(current)
        elif not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            current.rows.append((number, cells))
    return tables


def option_name(cell: str) -> str | None:
    """``x`` for a cell that is exactly `` `x` ``."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    return match.group(1) if match else None


def conf_groups() -> dict[str, set[str]]:
    """Group (``hydra/launcher`` for a nested one) -> its options, for every folder of conf/ with a yaml."""
    groups: dict[str, set[str]] = {}
    for path in CONF_DIR.rglob("*.yaml"):
        if path.parent != CONF_DIR:
            groups.setdefault(path.parent.relative_to(CONF_DIR).as_posix(), set()).add(path.stem)
    return groups


def pipeline_experiments() -> set[str]:
    return {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if "point" in yaml.safe_load(p.read_text())}


def compare(listed: dict[str, int], present: set[str], table: Table, group: str, how_to_add: str) -> list[str]:
    """Problems of one table's list of ``group`` options (option -> README line) against conf/."""
    problems = [
        f"{table.title()} lacks option `{name}` of conf/{group}/: add the row {how_to_add.format(name=name)}"
        for name in sorted(present - set(listed))
    ]
    problems += [
        f"{table.title()} line {line} lists `{name}`, which is not in conf/{group}/: remove the row"
        for name, line in sorted(listed.items())
        if name not in present
    ]
    return problems


def check_readme(text: str) -> list[str]:
    """Every disagreement between the README's config-group tables and conf/, one line each."""
    groups = conf_groups()
    problems: list[str] = []
    overview = [t for t in markdown_tables(text) if t.header[:2] == ["group", "option"]]
    if len(overview) != 1:
        return [f"README.md has {len(overview)} tables with the header '| group | option | ... |'; it needs one"]
    listed: dict[str, dict[str, int]] = {}
    for line, cells in overview[0].rows:
        group, option = (option_name(cell) for cell in cells[:2])
        if group is None or option is None:
            problems.append(f"{overview[0].title()} line {line}: write the group and the option as `name`")
        elif option in listed.setdefault(group, {}):
            problems.append(f"{overview[0].title()} line {line}: `{group}` `{option}` is listed twice")
        else:
            listed[group][option] = line
    for group in sorted(set(groups) - NOT_LISTED | set(listed)):
        how = f"'| `{group}` | `{{name}}` | <its yaml's header comment> |'"
        problems += compare(listed.get(group, {}), groups.get(group, set()), overview[0], group, how)

    for table in markdown_tables(text):
        first = table.header[0]
        if first in groups:
            present, group = groups[first], first
        elif first == "pipeline experiment":
            present, group = pipeline_experiments(), "experiment"
        else:
            continue
        names = {option_name(cells[0]): line for line, cells in table.rows}
        problems += [
            f"{table.title()} line {line}: write the option as `name`" for name, line in names.items() if name is None
        ]
        names.pop(None, None)
        problems += compare(names, present, table, group, "'| `{name}` | ... |'")
    return problems


def test_the_readme_tables_list_exactly_the_options_in_conf():
    problems = check_readme(README.read_text())
    assert not problems, "README.md and conf/ disagree:\n" + "\n".join(problems)


def test_a_missing_or_stale_option_is_named_with_its_table():
    text = README.read_text()
    missing = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith("| `tar` |") and not line.startswith("| `attack` | `bft_sharegpt_lora` |")
    )
    stale = text.replace("| `logger` | `wandb` |", "| `logger` | `tensorboard` |")
    problems = check_readme(missing)
    assert any(
        "'| defense | objective | data (streams) |'" in p and "lacks option `tar` of conf/defense/" in p
        for p in problems
    ), problems
    assert any(
        "'| group | option | what it is |'" in p and "lacks option `bft_sharegpt_lora` of conf/attack/" in p
        for p in problems
    ), problems
    assert len(problems) == 2, problems
    problems = check_readme(stale)
    assert any("lists `tensorboard`, which is not in conf/logger/" in p for p in problems), problems
    assert any("lacks option `wandb` of conf/logger/" in p for p in problems), problems
