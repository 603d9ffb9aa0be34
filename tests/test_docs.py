"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

The blocks of one Markdown file run in order, in one namespace (a later block may use an earlier block's names), in
one fresh Python process per file (so a block that registers a role or seeds torch changes nothing for the other
tests), with a temporary folder as the current directory (files the blocks write go away). Each block is one test,
named `<file>#<index>`; its failure shows the block's own traceback with the Markdown file's line numbers.

Markers, as comment lines at the top of a block:
    # doctest: skip <why>          the block is illustrative and is not run (say why)
    # doctest: requires timm       skipped unless the module(s) can be imported (comma-separated)
A ```toml block whose first line is `# <name>.toml` is written to that file in the temporary folder before the
blocks after it run (docs/rules.md's `lora.toml`). `<!-- doctest: slow -->` anywhere in a Markdown file marks all
its blocks `slow` (they run in `make test`, not under -m "not slow").

    python tests/test_docs.py docs/tutorials.md       # run one file's blocks by hand, printing their output
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^#\s*doctest:\s*(?P<kind>skip|requires)\b[ \t:]*(?P<arg>.*)$")
SLOW_FILE = "<!-- doctest: slow -->"
TIMEOUT_S = 900


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # 1-based line of the block's first code line in the Markdown file
    code: str
    skip: str | None = None  # why the block is not run
    requires: tuple[str, ...] = ()


def doc_files() -> list[pathlib.Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


def blocks(path: pathlib.Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order, with its doctest markers."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i + 1
        j = start
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            j += 1
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start:j])
        block = Block(lang, start + 1, code + "\n")
        for text in code.splitlines():
            marker = MARKER.match(text.strip())
            if not text.strip().startswith("#"):
                break
            if marker and marker.group("kind") == "skip":
                block.skip = marker.group("arg").strip() or "marked # doctest: skip"
            elif marker:
                block.requires += tuple(x.strip() for x in marker.group("arg").split(",") if x.strip())
        out.append(block)
        i = j + 1
    return out


def python_blocks(path: pathlib.Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in ("python", "py", "python3")]


# ------------------------------------------------------------------------------------------------ the runner
def run_file(path: pathlib.Path, workdir: pathlib.Path, echo: bool = False) -> list[dict]:
    """Run the python blocks of `path` in order in one namespace, with `workdir` as the current folder.

    Returns one result per python block: {"line", "status": "passed" | "failed" | "skipped", "detail", "output",
    "seconds"}. A failure does not stop the file: later blocks still run (a later failure then says which earlier
    block failed, as its names may be missing)."""
    import importlib.util

    namespace: dict = {"__name__": "__main__", "__file__": str(path)}
    results: list[dict] = []
    failed_at = None
    old_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for block in blocks(path):
            if block.lang == "toml":
                first = block.code.splitlines()[0].strip() if block.code.strip() else ""
                name = re.fullmatch(r"#\s*([\w.-]+\.toml)\b.*", first)
                if name:
                    (workdir / name.group(1)).write_text(block.code, encoding="utf-8")
                continue
            if block.lang not in ("python", "py", "python3"):
                continue
            result = {"line": block.line, "status": "skipped", "detail": "", "output": "", "seconds": 0.0}
            results.append(result)
            missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
            if block.skip:
                result["detail"] = f"# doctest: skip {block.skip}"
                continue
            if missing:
                result["detail"] = f"requires {', '.join(missing)} (not installed)"
                continue
            output = io.StringIO()
            start = time.perf_counter()
            try:
                # pad with blank lines so tracebacks point at the Markdown file's own line numbers
                code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                with contextlib.redirect_stdout(Tee(output, sys.stdout) if echo else output):
                    exec(code, namespace)
                result["status"] = "passed"
            except BaseException as e:  # noqa: BLE001 (SystemExit and KeyboardInterrupt in a block are failures too)
                tb = traceback.TracebackException.from_exception(e)
                tb.stack = traceback.StackSummary.from_list(
                    [f for f in tb.stack if f.filename != __file__] or list(tb.stack))
                result["status"], result["detail"] = "failed", "".join(tb.format())
                if failed_at is not None:
                    result["detail"] += f"(an earlier block, at line {failed_at}, failed too: this may follow from it)"
                failed_at = failed_at or block.line
                if isinstance(e, KeyboardInterrupt):
                    raise
            result["seconds"] = round(time.perf_counter() - start, 2)
            result["output"] = output.getvalue()[-4000:]
    finally:
        os.chdir(old_cwd)
    return results


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)


class Runs:
    """One `python tests/test_docs.py --json OUT FILE` process per Markdown file, all started at once (they mostly
    wait on imports and tracing, so two cores overlap them), each with its own temporary folder."""

    def __init__(self, paths):
        self.tmp = tempfile.TemporaryDirectory(prefix="lora_fx-docs-")
        self.procs, self.results = {}, {}
        for path in sorted(set(paths)):
            self._start(path)

    def _start(self, path: pathlib.Path) -> None:
        workdir = pathlib.Path(self.tmp.name) / str(len(self.procs))
        workdir.mkdir()
        out, log = workdir / "results.json", workdir / "log.txt"
        with open(log, "w") as log_file:  # a file, not a pipe: a chatty run never blocks on a full pipe
            proc = subprocess.Popen([sys.executable, __file__, "--json", str(out), str(path)], cwd=workdir,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        self.procs[path] = (proc, out)

    def get(self, path: pathlib.Path) -> list[dict]:
        if path not in self.results:
            if path not in self.procs:  # not among the selected tests when the runs started
                self._start(path)
            proc, out = self.procs[path]
            log = lambda: (out.parent / "log.txt").read_text(errors="replace")[-5000:]
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the blocks of {path} ran over {TIMEOUT_S} s:\n{log()}") from None
            if proc.returncode != 0 or not out.is_file():
                raise AssertionError(f"the docs runner crashed on {path} (exit {proc.returncode}):\n{log()}")
            self.results[path] = json.loads(out.read_text())
        return self.results[path]

    def close(self):
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.tmp.cleanup()


# ------------------------------------------------------------------------------------------------ the tests
def _params():
    for path in doc_files():
        slow = SLOW_FILE in path.read_text(encoding="utf-8")
        for i, block in enumerate(python_blocks(path)):
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(path, i, id=f"{path.relative_to(ROOT).as_posix()}#{i}", marks=marks)


@pytest.fixture(scope="module")
def runs(request):
    """Start the runs of every Markdown file that has a selected test."""
    selected = [item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_doc_block" and hasattr(item, "callspec")]
    runs = Runs(selected)
    yield runs
    runs.close()


@pytest.mark.parametrize("path,index", list(_params()))
def test_doc_block(runs, path, index):
    result = runs.get(path)[index]
    where = f"{path.relative_to(ROOT)} line {result['line']}"
    if result["status"] == "skipped":
        pytest.skip(f"{where}: {result['detail']}")
    if result["status"] == "failed":
        pytest.fail(f"the python block at {where} fails:\n{result['detail']}\n--- its output ---\n"
                    f"{result['output']}", pytrace=False)


def test_troubleshooting_covers_every_error_class():
    """docs/troubleshooting.md has a section for every LoraFxError class lora_fx.errors defines."""
    from lora_fx import errors

    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    classes = [c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LoraFxError)]
    assert "LoraFxError" in classes and len(classes) > 5
    assert [c for c in classes if f"\n## {c}\n" not in text] == []


def test_markers_are_parsed(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\n# doctest: skip needs a GPU\nx = 1\n```\n\n"
                   "```toml\n# r.toml\n[[rule]]\nname = 'q'\n```\n\n"
                   "```python\n# doctest: requires no_such_module_xyz, os\nimport no_such_module_xyz\n```\n\n"
                   "   ```python\n   open('out.txt', 'w').write('hi')\n   y = 2\n   ```\n\n"
                   "```python\nassert y == 2 and open('r.toml').read().startswith('# r.toml')\n"
                   "import os\nassert os.path.exists('out.txt')\n```\n\n"
                   "```python\nraise ValueError('boom')\n```\n\n```python\nz = 3\n```\n")
    found = python_blocks(doc)
    assert [b.line for b in found] == [4, 15, 20, 25, 31, 35]
    assert found[0].skip == "needs a GPU" and found[1].requires == ("no_such_module_xyz", "os")
    results = run_file(doc, tmp_path)
    assert [r["status"] for r in results] == ["skipped", "skipped", "passed", "passed", "failed", "passed"]
    assert "requires no_such_module_xyz" in results[1]["detail"]
    assert f'File "{doc}", line 31' in results[4]["detail"] and "ValueError: boom" in results[4]["detail"]
    assert results[5]["status"] == "passed"  # a failure does not stop the blocks after it


# ------------------------------------------------------------------------------------------------ by hand
def _main(argv: list[str]) -> int:
    """`python tests/test_docs.py FILE...` runs the files' blocks, printing their output and a status per block;
    `--json OUT FILE` (what the tests use) writes the results of one file to OUT."""
    json_out = None
    if argv[:1] == ["--json"]:
        json_out, argv = pathlib.Path(argv[1]), argv[2:]
    if not argv or (json_out is not None and len(argv) != 1):
        print(__doc__)
        return 2
    sys.path[0] = str(ROOT)  # as a session started in the repository: not this tests/ folder
    status = 0
    for name in argv:
        path = pathlib.Path(name).resolve()
        with tempfile.TemporaryDirectory(prefix="lora_fx-docs-") as tmp:
            results = run_file(path, pathlib.Path(tmp), echo=json_out is None)
        if json_out is not None:
            json_out.write_text(json.dumps(results))
            return 0
        for r in results:
            print(f"{path.name} line {r['line']}: {r['status']} ({r['seconds']} s) {r['detail']}", file=sys.stderr)
            status |= r["status"] == "failed"
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
