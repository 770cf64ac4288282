"""The documentation, as text: links resolve, named scripts and options exist, the README stays
a landing page, and measured figures live only in BENCHMARKS.md."""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
# The pages whose links are checked, and that must hold no measured figure (BENCHMARKS.md is
# where the figures live; CHANGELOG.md is history).
PAGES = [README, REPO / "CONTRIBUTING.md", *DOCS]
README_MAX_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Measured figures: a speed in steps per second, or a duration in minutes and seconds.
MEASURED = re.compile(r"\d+(?:\.\d+)?\s*steps/s|\d+ min \d+ s")
TRAIN = re.compile(r"(?:horovod_leader\.train|horovod-leader-train|launch/slurm\.sbatch)\b")
SCRIPT = re.compile(r"\b(?:launch|benchmarks|examples)/[A-Za-z0-9_.*/-]*[A-Za-z0-9_*/]")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(text: str):
    return [m.group(0) for m in FENCE.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens and spaces kept),
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path):
    """The targets of the Markdown links outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", path.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto, ...; anchors within the page
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve()
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {rel(resolved)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_slug_follows_github():
    assert slug("Straggler: synchronous against asynchronous") == "straggler-synchronous-against-asynchronous"
    assert slug("The papers' claims on an emulated cluster") == "the-papers-claims-on-an-emulated-cluster"
    assert slug("What still differs from the authors'") == "what-still-differs-from-the-authors"
    assert slug("`state_dict` and checkpoints") == "state_dict-and-checkpoints"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_scripts_exist(page):
    missing = sorted({path for path in SCRIPT.findall(page.read_text())
                      if "*" not in path and not (REPO / path).exists()})
    assert not missing, f"{rel(page)} names scripts that do not exist: {missing}"


def training_commands(text: str):
    """Each logical line of a code block (continuations joined) that runs the training command,
    as the words after the command's name."""
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            m = TRAIN.search(line)
            if m:
                yield line, shlex.split(line[m.end():], comments=False)


@pytest.fixture(scope="module")
def training_options():
    from horovod_leader.training.command import build_parser

    return set(build_parser()._option_string_actions)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_training_command_options_exist(page, training_options):
    unknown = []
    for line, words in training_commands(page.read_text()):
        for word in words:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in training_options:
                unknown.append(f"{option} in: {line.strip()}")
    assert not unknown, f"{rel(page)}: not options of the training command: " + "; ".join(unknown)


def test_readme_runs_the_training_command():
    # what the option check above reads in the README
    assert list(training_commands(README.read_text()))


def test_readme_is_a_landing_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_measured_figure_pattern():
    assert MEASURED.search("data-parallel SGD 67.1% at 1.89 steps/s")
    assert MEASURED.search("it took **4 min 13 s** once set up")
    assert not MEASURED.search("steps per second, with a period of 4 steps")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_measured_figures_outside_benchmarks(page):
    found = [m.group(0) for m in MEASURED.finditer(page.read_text())]
    assert not found, f"{rel(page)} states measured figures {found}: they belong in BENCHMARKS.md"
