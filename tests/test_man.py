"""man/vergeai.1: renders without warnings, and documents exactly the CLI's commands and options.

Whoever adds, renames or removes a command or an option changes the page too;
the comparison tests below say what is missing on which side.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from vergeai.cli import app

PAGE = Path(__file__).resolve().parent.parent / "man" / "vergeai.1"

# Typer's own options: --help on every command, shell completion on the root.
TYPER_OPTIONS = frozenset({"--help", "--install-completion", "--show-completion"})
SECTIONS = (
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "COMMANDS",
    "OPTIONS",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "EXAMPLES",
    "SEE ALSO",
)
# The man(7) macros, the groff extensions that man-db and mandoc both know, and the few
# plain roff requests a man page may use: anything else is a typo or out of place.
MACROS = frozenset(
    {
        *("TH", "SH", "SS", "TP", "TQ", "PP", "LP", "P", "IP", "RS", "RE"),  # structure
        *("B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SB", "SM"),  # fonts
        *("SY", "YS", "OP", "EX", "EE", "UR", "UE", "MT", "ME"),  # groff's man extensions
        *("nf", "fi", "br", "sp", "nh", "hy", "ad", "na", "ne", "nr"),  # roff requests
    }
)
MAN_WIDTH = 80

COMMENT = re.compile(r"[.']\s*\\\"")
LONG_OPTION = re.compile(r"(?:\\-){2}([A-Za-z0-9]+(?:\\-[A-Za-z0-9]+)*)")
FONT = re.compile(r"\\f(\[[^]\n]*\]|\(..|.)")
OPTION_TOKEN = re.compile(r"(?:^|(?<=[\s\[|(\"]))((?:\\?-){1,2}[A-Za-z][A-Za-z0-9\\-]*)")
CHARS = {
    "\\-": "-",
    "\\(aq": "'",
    "\\(dq": '"',
    "\\(ti": "~",
    "\\(lq": '"',
    "\\(rq": '"',
    "\\ ": " ",
    "\\~": " ",
    "\\&": "",
    "\\e": "\\",
}


# --- the page ---------------------------------------------------------------------------


def page_lines() -> list[tuple[int, str]]:
    """(line number, line) for every line that is not a comment."""
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    return [(number, line) for number, line in enumerate(lines, start=1) if not COMMENT.match(line)]


def plain(line: str) -> str:
    """The text a roff line shows, near enough: no fonts, escapes resolved, no macro name."""
    if line.startswith("."):
        line = line.partition(" ")[2].replace('"', "")
    line = FONT.sub("", line)
    for escape, text in CHARS.items():
        line = line.replace(escape, text)
    return line


def request_name(line: str) -> str:
    """'TP' for '.TP', '' for a lone '.'."""
    words = line[1:].split(maxsplit=1)
    return words[0] if words else ""


def sections() -> Iterator[tuple[str, int, str]]:
    """(section name, line number, line) for every line of the page after the first .SH."""
    current = ""
    for number, line in page_lines():
        if line.startswith(".SH"):
            current = plain(line).strip()
        elif current:
            yield current, number, line


def page_long_options() -> dict[str, list[int]]:
    """Every --option the page mentions (written \\-\\-name), with the lines it is on."""
    found: dict[str, list[int]] = {}
    for number, line in page_lines():
        for match in LONG_OPTION.finditer(line):
            name = "--" + match.group(1).replace("\\-", "-")
            found.setdefault(name, []).append(number)
    return found


def page_mentions_short_option(option: str) -> bool:
    pattern = re.compile(r"(?<!\\-)\\-" + re.escape(option[1:]) + r"(?![A-Za-z0-9])")
    return any(pattern.search(line) for _, line in page_lines())


def page_commands() -> dict[str, int]:
    """Commands documented in COMMANDS: a .TP whose tag starts "\\fBvergeai <path>"."""
    found: dict[str, int] = {}
    previous = ""
    for section, number, line in sections():
        if section == "COMMANDS" and previous.startswith(".TP"):
            words = plain(line).split()
            if words[:1] == ["vergeai"]:
                path = []
                for word in words[1:]:
                    if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                        break
                    path.append(word)
                found[" ".join(path)] = number
        previous = line
    return found


# --- the CLI ----------------------------------------------------------------------------


def cli_commands() -> dict[str, set[str]]:
    """Every command path ('' for the root, 'user create', …) and the options it takes."""
    found: dict[str, set[str]] = {}

    # Typer may ship its own copy of click: look at the objects, not at their classes.
    def walk(command: Any, path: tuple[str, ...]) -> None:
        if getattr(command, "hidden", False):
            return
        options: set[str] = set()
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                options.update(param.opts, param.secondary_opts)
        found[" ".join(path)] = options - TYPER_OPTIONS
        for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def cli_leaf_commands() -> set[str]:
    paths = set(cli_commands())
    return {p for p in paths if p and not any(q.startswith(p + " ") for q in paths)}


def commands_taking(option: str) -> str:
    users = sorted(path or "vergeai" for path, opts in cli_commands().items() if option in opts)
    return ", ".join(users)


# --- (a) it renders cleanly ---------------------------------------------------------------


def renderers() -> list[tuple[list[str], dict[str, str]]]:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": str(MAN_WIDTH)}
    env.update(MANPAGER="cat", PAGER="cat")
    found: list[tuple[list[str], dict[str, str]]] = []
    if shutil.which("groff"):
        found.append((["groff", "-man", "-ww", "-z", str(PAGE)], env))
        found.append((["groff", "-man", "-ww", "-z", "-Tutf8", str(PAGE)], env))
    if shutil.which("man"):
        version = subprocess.run(
            ["man", "--version"], capture_output=True, text=True, env=env, timeout=30
        )
        if version.returncode == 0 and version.stdout.startswith("man "):  # man-db
            found.append((["man", "--warnings", "-l", str(PAGE)], env))
    return found


def test_page_renders_without_warnings() -> None:
    """groff -ww (every warning) on the default and the UTF-8 device, and man-db at 80 columns."""
    available = renderers()
    if not available:
        pytest.skip(
            "neither groff nor man-db's man is installed (apt-get install man-db groff); "
            "test_page_structure still checked the page without them"
        )
    problems = []
    for argv, env in available:
        run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        if run.returncode != 0 or run.stderr.strip():
            problems.append(f"$ {' '.join(argv)}  (exit {run.returncode})\n{run.stderr}")
        wide = [line for line in run.stdout.splitlines() if len(line) > MAN_WIDTH]
        if argv[0] == "man" and wide:
            problems.append(
                f"$ MANWIDTH={MAN_WIDTH} {' '.join(argv)}: lines wider than {MAN_WIDTH}:\n"
                + "\n".join(wide)
            )
    assert not problems, "man/vergeai.1 does not render cleanly:\n" + "\n".join(problems)


def test_page_structure() -> None:
    """What a renderer would catch, checked in plain Python for machines without groff."""
    lines = page_lines()
    problems: list[str] = []
    requests = [(n, line) for n, line in lines if line.startswith((".", "'"))]
    if not requests or not re.match(r'\.TH VERGEAI 1 \S+ "?\w', requests[0][1]):
        problems.append("the first request must be .TH VERGEAI 1 DATE SOURCE ...")
    headings = [plain(line).strip() for _, line in requests if line.startswith(".SH ")]
    problems += [f"no .SH {name} section" for name in SECTIONS if name not in headings]
    if headings[:2] != ["NAME", "SYNOPSIS"]:
        problems.append(f"sections must start with NAME, SYNOPSIS, not {headings[:2]}")
    for number, line in requests:
        if line.startswith("'") or request_name(line) not in MACROS:
            problems.append(f"line {number}: unknown or unsafe request {line!r}")
    for opener, closer, most in (
        ("SY", "YS", 1),
        ("EX", "EE", 1),
        ("nf", "fi", 1),
        ("RS", "RE", 9),
    ):
        depth = 0
        for number, line in requests:
            name = request_name(line)
            depth += (name == opener) - (name == closer)
            if not 0 <= depth <= most:
                problems.append(f"line {number}: unbalanced .{opener}/.{closer}")
                depth = max(0, min(depth, most))
        if depth:
            problems.append(f".{opener} without .{closer} at the end")
    for number, line in lines:
        if not line.strip():
            problems.append(f"line {number}: blank line (use .PP or .sp)")
        font = "R"
        for match in FONT.finditer(line):
            code = match.group(1).strip("[(]")
            font = "R" if code in ("R", "P", "") else code
        if font != "R":
            problems.append(f"line {number}: ends in font \\f{font}; close it with \\fR")
        if "\\f" in FONT.sub("", line):
            problems.append(f"line {number}: malformed font escape")
        for token in OPTION_TOKEN.findall(FONT.sub("", line)):
            if re.search(r"(?<!\\)-", token):
                problems.append(f"line {number}: unescaped '-' in {token!r}; write \\-")
    assert not problems, "man/vergeai.1:\n" + "\n".join(problems)


# --- (b) it documents exactly the CLI ---------------------------------------------------


def test_page_documents_every_cli_command_and_option() -> None:
    documented = page_long_options()
    missing = []
    for path in sorted(cli_leaf_commands() - set(page_commands())):
        missing.append(f"  command  vergeai {path}")
    options = sorted(set().union(*cli_commands().values()))
    for option in options:
        known = (
            option in documented if option.startswith("--") else page_mentions_short_option(option)
        )
        if not known:
            missing.append(f"  option   {option}  (taken by: {commands_taking(option)})")
    assert not missing, (
        "The CLI has commands or options that man/vergeai.1 does not document:\n"
        + "\n".join(missing)
        + "\nDocument each option in OPTIONS (written \\-\\-name) and each command in COMMANDS"
        + ' as a .TP entry whose tag starts "\\fBvergeai <command>\\fR".'
    )


def test_every_documented_command_and_option_exists() -> None:
    cli_options = set().union(*cli_commands().values()) | TYPER_OPTIONS
    cli_paths = cli_leaf_commands()
    extra = []
    for path, number in sorted(page_commands().items()):
        if path not in cli_paths:
            extra.append(f"  command  vergeai {path}  (page line {number})")
    for option, numbers in sorted(page_long_options().items()):
        if option not in cli_options:
            where = ", ".join(map(str, numbers))
            extra.append(f"  option   {option}  (page lines {where})")
    assert not extra, (
        "man/vergeai.1 documents commands or options that the CLI does not have:\n"
        + "\n".join(extra)
        + "\nAdd them to the CLI, or take them out of the page."
    )


def test_assistant_option_ranges_match_the_record_table() -> None:
    """Each assistant option's entry states the range its field declares."""
    import dataclasses

    from vergeai.state.assistants import Assistant
    from vergeai.state.schema import setting_of

    text = PAGE.read_text(encoding="utf-8")
    section = text.split(".SS Assistant options", 1)[1].split("\n.SS ", 1)[0]
    entries = section.split("\n.TP\n")
    for f in dataclasses.fields(Assistant):
        meta = setting_of(f)
        if meta is None or not meta.span():
            continue
        flag = "\\-\\-" + f.name.replace("_", "\\-")
        entry = next((e for e in entries if e.startswith(f'.BI {flag} "')), None)
        assert entry is not None, flag
        span = meta.span().replace("-", "\\-")
        assert span in " ".join(entry.split()), (flag, span)
