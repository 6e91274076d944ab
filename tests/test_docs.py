"""The docs' cross-references: README.md, STATUS.md and benchmarks/README.md, as a reader follows them.

What is guarded: every relative link names a file that exists and, after a ``#``, a heading of that file
(the README's Status table links each row to a section of STATUS.md: a heading renamed there leaves the
link pointing at the top of the page, and nothing else fails); the README's "Where things live" table
names every module of the package and every benchmark script (a module added without its row is
invisible to a reader); and CI runs the README's test command, not a variant of it (`.ci/run` says it
does). The README's Python examples are run by tests/test_packaging.py.
"""
import re

from conftest import ROOT

DOCS = ("README.md", "STATUS.md", "benchmarks/README.md")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a ``#`` comment in a bash block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc) -> set:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", _prose(doc.read_text()), re.M)}


def test_every_relative_link_in_the_docs_names_a_file_and_a_heading_that_exist():
    broken, checked = [], 0
    for name in DOCS:
        doc = ROOT / name
        for link in re.findall(r"\]\(([^)\s]+)\)", _prose(doc.read_text())):
            if re.match(r"[a-z]+:", link):  # https: and the like
                continue
            checked += 1
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists():
                broken.append(f"{name}: {link} (no file {path})")
            elif anchor and anchor not in _anchors(target):
                broken.append(f"{name}: {link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert checked >= 20, f"only {checked} links found: has the link syntax or the docs' layout changed?"
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def _where_things_live() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Where things live\n" in text
    return text.split("\n## Where things live\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_where_things_live_table_names_every_module_and_benchmark():
    table = _where_things_live()
    package = ROOT / "vlmrm_fast"
    missing = []
    for path in sorted(package.glob("*.py")):  # top-level modules: by path, by file name, or in the small-modules row
        if path.name != "__init__.py" and not any(
                name in table for name in (f"vlmrm_fast/{path.name}", f"`{path.name}`", f"`{path.stem}`")):
            missing.append(str(path.relative_to(ROOT)))
    for sub in sorted(p for p in package.iterdir() if (p / "__init__.py").exists()):
        if f"`vlmrm_fast/{sub.name}/" not in table:  # the package's row, or rows of its modules
            missing.append(f"vlmrm_fast/{sub.name}/")
    # The subpackages whose rows list their modules by name (ops by path, the others by name).
    for sub in ("ops", "backends", "profiler", "render", "wrappers", "train", "envs"):
        rows = "\n".join(line for line in table.splitlines() if line.startswith(f"| `vlmrm_fast/{sub}/"))
        for path in sorted((package / sub).glob("*.py")):
            if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.stem)}\b", rows):
                missing.append(str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.sh")):
        if f"`{path.name}`" not in table:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, "modules the README's 'Where things live' table does not name: " + ", ".join(missing)


def test_ci_runs_the_readmes_test_command():
    setup = (ROOT / "README.md").read_text().split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands  # 1. the main job, 2. the tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]
