"""Every file qadapt writes goes through qadapt/io.py: a static check over qadapt/ and tools/, plus the helpers.

The check walks the syntax tree of every module and flags calls that write files by
themselves (``open`` for writing, ``write_text``/``write_bytes``, ``json.dump``, ``torch.save``,
safetensors' ``save_file``, ``save_pretrained``, ``GGUFWriter``, ``shutil`` copies and moves,
renames, boto3 downloads, Hub downloads). Such a call is fine inside a
``with atomic_path(...)`` / ``atomic_open(...)`` / ``atomic_dir(...)`` block (it writes the
temp path that the block renames into place on success), inside qadapt/io.py, Hub downloads
inside qadapt/hub.py (huggingface_hub writes a process-unique temp file under a per-file lock
and renames it; see SECURITY.md), and at the few places in ALLOWED, each with its reason.
A new direct writer anywhere else fails this test: route it through qadapt/io.py.
"""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import pytest

from qadapt.errors import InputError
from qadapt.io import atomic_dir, atomic_open, atomic_write, open_log

ROOT = Path(__file__).resolve().parent.parent
ATOMIC_BLOCKS = {"atomic_path", "atomic_open", "atomic_dir"}
WRITER_FUNCS = {"save_file", "GGUFWriter", "hf_hub_download", "snapshot_download"}
WRITER_METHODS = {"write_text", "write_bytes", "save_pretrained", "tofile", "download_file", "download_fileobj",
                  "rename", "symlink_to", "hardlink_to"}
WRITER_QUALIFIED = {("json", "dump"), ("torch", "save"), ("np", "save"), ("np", "savez"), ("numpy", "save"),
                    ("os", "rename"), ("os", "replace"), ("os", "link"), ("os", "symlink"), ("os", "open"),
                    ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"),
                    ("shutil", "move"), ("pickle", "dump")}
#: (file, a string the flagged line contains) -> why it may write directly
ALLOWED = {
    ("qadapt/cache.py", 'open(path, "a+b")'): "the cache's lock file: opened for flock, never written",
    ("qadapt/hub.py", "hf_hub_download("): "huggingface_hub: per-file lock, unique temp file, atomic rename",
    ("qadapt/hub.py", "snapshot_download("): "the same, per file of the snapshot",
}


def _name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _writes(call: ast.Call) -> str | None:
    """What kind of direct write ``call`` is, or None."""
    f = call.func
    if isinstance(f, ast.Name):
        if f.id == "open":
            mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"),
                                                                  None)
            if mode is None or not isinstance(mode, ast.Constant):
                return None if mode is None else "open() with a computed mode"
            return f"open(..., {mode.value!r})" if set(str(mode.value)) & set("wax+") else None
        return f.id if f.id in WRITER_FUNCS else None
    if isinstance(f, ast.Attribute):
        base = _name(f.value)
        if (base, f.attr) in WRITER_QUALIFIED:
            return f"{base}.{f.attr}"
        if f.attr == "open" and base not in ("os", "io", "gzip", "tarfile", "zipfile"):  # Path.open(mode)
            mode = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
                return f".open({mode.value!r})"
        if f.attr in WRITER_METHODS or f.attr in WRITER_FUNCS:
            return f".{f.attr}"
    return None


def direct_writers(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, atomic: bool) -> None:
        if isinstance(node, (ast.With, ast.AsyncWith)):
            atomic = atomic or any(isinstance(i.context_expr, ast.Call) and _name(i.context_expr.func) in ATOMIC_BLOCKS
                                   for i in node.items)
        if isinstance(node, ast.Call) and not atomic:
            what = _writes(node)
            if what:
                found.append((node.lineno, what))
        for child in ast.iter_child_nodes(node):
            visit(child, atomic)

    visit(tree, False)
    return found


def test_no_direct_writers_outside_io():
    files = sorted([*ROOT.glob("qadapt/**/*.py"), *ROOT.glob("tools/*.py")])
    assert len(files) > 50
    bad = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel == "qadapt/io.py":
            continue
        lines = f.read_text().splitlines()
        for lineno, what in direct_writers(f):
            line = lines[lineno - 1]
            if not any(rel == af and s in line for af, s in ALLOWED):
                bad.append(f"{rel}:{lineno}: {what}: {line.strip()}")
    assert not bad, "files written without qadapt/io.py (use atomic_write / atomic_open / atomic_path / " \
                    "atomic_dir / write_json, or open_log for a process's log):\n" + "\n".join(bad)


def test_the_check_catches_writers(tmp_path):
    """The scanner itself: each kind of direct write is found, the same call inside an atomic block is not."""
    src = tmp_path / "m.py"
    src.write_text(
        "import json, shutil, torch\n"
        "open(p, 'w')\n"                                   # 2
        "p.write_text('x')\n"                              # 3
        "json.dump(obj, f)\n"                              # 4
        "torch.save(t, p)\n"                               # 5
        "model.save_pretrained(d)\n"                       # 6
        "shutil.copy(a, b)\n"                              # 7
        "p.open('ab')\n"                                   # 8
        "open(p)\n"                                        # reading: fine
        "with atomic_path(p) as tmp:\n"
        "    save_file(sd, str(tmp))\n"                    # inside an atomic block: fine
        "with atomic_dir(d) as tmp:\n"
        "    model.save_pretrained(tmp)\n"
    )
    assert [n for n, _ in direct_writers(src)] == [2, 3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------------- the helpers
def test_atomic_write_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, b"old")
    with pytest.raises(InputError, match="exists"):
        atomic_write(target, b"new")  # never overwrite without force
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb", force=True) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temp file left behind


def test_atomic_dir(tmp_path):
    d = tmp_path / "adapter"
    with atomic_dir(d) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        assert not d.exists()  # invisible until the block ends
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json"]
    with pytest.raises(InputError, match="exists"):
        with atomic_dir(d):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(d, force=True) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json"]  # the old folder, untouched
    with atomic_dir(d, force=True) as tmp:
        (tmp / "new.json").write_text("{}")
    assert sorted(p.name for p in d.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp or old folder left


def test_concurrent_atomic_writers_leave_one_whole_file(tmp_path):
    """Writers racing on one path (processes sharing a cache): the result is one writer's whole file."""
    target = tmp_path / "shared.bin"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    errors = []

    def write(b: bytes) -> None:
        try:
            with atomic_open(target, "wb", force=True) as f:
                for k in range(0, len(b), 4096):
                    f.write(b[k:k + 4096])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_bytes() in blobs
    assert os.listdir(tmp_path) == ["shared.bin"]


def test_open_log_is_a_plain_stream(tmp_path):
    with open_log(tmp_path / "logs" / "worker.log") as f:
        f.write("started\n")
        f.flush()
        assert (tmp_path / "logs" / "worker.log").read_text() == "started\n"  # visible while written


def test_written_files_get_the_umask_permissions(tmp_path):
    """Not mkstemp's 0600: a model or cache file written by qadapt is readable as any new file would be."""
    old = os.umask(0o022)
    try:
        f = atomic_write(tmp_path / "model.gguf", b"x")
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "adapter_config.json").write_text("{}")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
