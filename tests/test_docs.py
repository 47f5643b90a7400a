"""README.md, docs/ and the READMEs they link: every relative link resolves (files and #anchors, with GitHub's
heading slugs), every docs page is reachable from the README, the README stays a front page
(under 250 lines), and its `make demo` sample is what the demo prints: the commands are the
Makefile's recipe, a short run of that recipe prints the same lines with the same wording and
files (numbers aside), and, marked slow, the full demo prints the same numbers (wall time
aside)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# every page a reader reaches from the README: docs/ and the other READMEs it links
PAGES = [README, *DOCS, ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "PROTOCOL.md",
         ROOT / "examples" / "flower_app" / "README.md"]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks, inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped
    (letters, digits, '_' and '-' stay), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in prose(path.read_text()) for m in LINK.finditer(line)]


def test_slug_follows_github():
    assert slug("Under the protocol: FedEMA-Distill's defaults, one switch at a time (claim 3, mnist1d)") == (
        "under-the-protocol-fedema-distills-defaults-one-switch-at-a-time-claim-3-mnist1d")
    assert slug("`fedavg`: FedAvg") == "fedavg-fedavg"
    assert slug("Flower: simulation and deployment") == "flower-simulation-and-deployment"
    assert slug("Earlier protocol: robustness, 20 % Byzantine clients") == (
        "earlier-protocol-robustness-20--byzantine-clients")


def test_anchor_duplicates_are_numbered(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A\n\n## Results\n\n```\n# not a heading\n```\n\n## Results\n")
    assert anchors(page) == {"a", "results", "results-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not checked offline
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if not t.startswith("#")}
    orphans = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link (add them to its Documentation list): {orphans}"


def test_readme_is_a_front_page():
    n = len(README.read_text().splitlines())
    assert n < 250, f"README.md has {n} lines; move detail to a docs/ page and link it"


# -- the make demo sample -------------------------------------------------------------------

def readme_demo_sample() -> list[str]:
    """The lines of the README code block that starts with ``$ make demo`` (without it)."""
    lines = README.read_text().splitlines()
    start = lines.index("$ make demo")
    end = next(i for i in range(start, len(lines)) if FENCE.match(lines[i]))
    return lines[start + 1:end]


def makefile_demo_recipe() -> list[str]:
    """The demo target's command lines as make echoes them with the default VENV."""
    text = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV \?= (\S+)", text, re.M).group(1)
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return [line.strip().replace("$(BIN)", f"{venv}/bin") for line in recipe.splitlines()]


def run_demo(tmp_path: Path, capsys, extra: list[str]) -> list[str]:
    """The demo recipe run in process, its run directory in ``tmp_path``; the printed lines
    as ``make demo`` shows them (each command echoed first, the run directory as in the
    Makefile). ``extra`` is added to the ``kdfl run`` arguments."""
    from kdfl.cli import main

    out = []
    for command in makefile_demo_recipe():
        argv = [str(tmp_path / "quickstart") if a == "runs/quickstart" else a for a in shlex.split(command)[1:]]
        if argv[0] == "run":
            argv += extra
        assert main(argv) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out.replace(str(tmp_path), "runs")
        out += [command, *printed.splitlines()]
    return out


def shape(line: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", line)


def test_readme_demo_commands_are_the_makefile_recipe():
    sample = readme_demo_sample()
    echoed = [line for line in sample if line.startswith(".venv/bin/")]
    assert echoed == makefile_demo_recipe()


def test_readme_demo_sample_has_the_lines_a_run_prints(tmp_path, capsys, monkeypatch):
    """One round of one local epoch of the demo's recipe (target accuracy lowered so that it
    is reached, as in the full run) prints the README's lines, with its wording and plot
    files; only numbers differ. The full run's numbers are checked by the slow test below."""
    monkeypatch.chdir(ROOT)
    quick = ["--set", "run.rounds=1", "--set", "local.epochs=1", "--set", "run.target_accuracy=0.05"]
    printed = run_demo(tmp_path, capsys, quick)
    assert [shape(x) for x in printed] == [shape(x) for x in readme_demo_sample()]


@pytest.mark.slow
def test_readme_demo_sample_is_what_make_demo_prints(tmp_path, capsys, monkeypatch):
    """The full demo (30 rounds, 10-50 s on 2 cores): the README's numbers, wall time aside."""
    monkeypatch.chdir(ROOT)
    printed = run_demo(tmp_path, capsys, [])

    def no_time(line: str) -> str:
        return re.sub(r"; \d+(\.\d+)? s$", "; <wall time> s", line)

    assert [no_time(x) for x in printed] == [no_time(x) for x in readme_demo_sample()]


# -- the headline figure ---------------------------------------------------------------------

def headline_figure():
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline_figure", ROOT / "benchmarks" / "headline_figure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_headline_figure_reads_the_protocol_table():
    hf = headline_figure()
    text = ("# sweep\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            "| method | local.lr | seeds | final acc | best acc | uplink KB/client/round |\n|---|---|---|---|---|---|\n"
            "| fedavg | 0.05 | 3 | 0.5308 ± 0.1950 | 0.6 ± 0.1 | 95.8 ± 0.0 |\n"
            "| fedema | 0.01 | 2 | 0.6535 | 0.7 | 40.1 ± 0.2 |\n\ntext\n| method | final acc | uplink KB/client/round |\n")
    a, b = hf.read_table(text)
    assert (a.method, a.lr, a.seeds, a.acc_mean, a.acc_std) == ("fedavg", "0.05", 3, 0.5308, 0.1950)
    assert a.uplink_mb == pytest.approx(0.0958) and b.uplink_mb == pytest.approx(0.0401)
    assert (b.method, b.acc_std) == ("fedema", 0.0)
    with pytest.raises(ValueError, match="no table"):
        hf.read_table("| method | final acc |\n|---|---|\n| x | 0.5 |\n")


def test_headline_figure_plots_every_method_of_the_result_files(tmp_path, capsys):
    hf = headline_figure()
    for name, _ in hf.PANELS:
        rows = [line for line in (hf.RESULTS / name).read_text().split("\n\n## ")[0].splitlines()
                if line.startswith("| ") and not line.startswith("| method")]
        assert len(hf.read_table((hf.RESULTS / name).read_text())) == len(rows) >= 4
    assert hf.main(["--out", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 10_000
    assert capsys.readouterr().out.count("final acc") == sum(
        len(hf.read_table((hf.RESULTS / n).read_text())) for n, _ in hf.PANELS)
