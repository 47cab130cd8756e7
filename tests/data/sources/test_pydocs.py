"""The `pydocs` source: docstrings of the Python standard library, parsed with ast."""

from __future__ import annotations

import sys

import pytest

from mmtool.data.sources import build_source
from mmtool.data.sources import pydocs
from mmtool.errors import MMToolError


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Keeps the JSON index cache out of the user's home during tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="module")
def src():
    return build_source("pydocs")


def test_corpus_size_ids_and_known_docstring(src):
    assert len(src) > 3000
    ids = [src.record_id(i) for i in range(len(src))]
    assert len(set(ids)) == len(ids)
    where = ids.index("pydocs/json.dumps")
    rec = src.read(where)
    assert rec.id == "pydocs/json.dumps" and rec.task == "text"
    (field,) = rec.fields
    assert (field.modality, field.role) == ("text", "document")
    assert field.data.startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert rec.meta["module"] == "json" and rec.meta["qualname"] == "dumps"
    assert rec.meta["file"] == "json/__init__.py" and rec.meta["line"] > 1
    # a method and a module docstring
    assert "pydocs/collections.OrderedDict" in ids or "pydocs/collections.Counter" in ids
    assert "pydocs/json" in ids


def test_no_tests_or_idle_and_nothing_imported(src):
    mods = {src.read(i).meta["module"] for i in range(0, len(src), 7)}
    assert not any(m.split(".")[0] in ("test", "idlelib", "lib2to3", "turtledemo") for m in mods)
    assert not any(".test." in f".{m}." or ".tests." in f".{m}." for m in mods)
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_modules_filter_and_min_chars():
    js = build_source("pydocs", ["modules=json"])
    mods = {js.read(i).meta["module"] for i in range(len(js))}
    assert "json" in mods and "json.decoder" in mods
    assert all(m == "json" or m.startswith("json.") for m in mods)
    both = build_source("pydocs", ["modules=json, collections"])
    assert len(both) > len(js)
    # ids do not depend on the filter
    full = build_source("pydocs")
    assert set(js.record_id(i) for i in range(len(js))) <= {full.record_id(i) for i in range(len(full))}

    long = build_source("pydocs", ["modules=json", "min_chars=200"])
    assert 0 < len(long) < len(js)
    assert all(len(long.read(i).fields[0].data) >= 200 for i in range(len(long)))
    assert all(len(js.read(i).fields[0].data) >= 40 for i in range(len(js)))
    assert len(build_source("pydocs", ["modules=json", "min_chars=0"])) > len(js)


def test_max_chars_truncates_at_whitespace():
    src = build_source("pydocs", ["modules=json", "max_chars=120"])
    texts = [src.read(i) for i in range(len(src))]
    assert all(len(r.fields[0].data) <= 120 for r in texts)
    cut = [r for r in texts if "truncated_from" in r.meta]
    assert cut and all(r.meta["truncated_from"] > 120 for r in cut)
    whole = build_source("pydocs", ["modules=json"])
    for r in cut:
        full_text = whole.read([whole.record_id(i) for i in range(len(whole))].index(r.id)).fields[0].data
        assert full_text.startswith(r.fields[0].data)


def test_empty_selection_names_the_option():
    with pytest.raises(MMToolError, match="modules"):
        build_source("pydocs", ["modules=no_such_module_xyz"])
    with pytest.raises(IndexError):
        build_source("pydocs", ["modules=json"]).read(-1)


def test_index_is_deterministic_and_cache_round_trips(tmp_path):
    index = pydocs.load_index()
    root = pydocs.stdlib_root()
    path = tmp_path / "idx.json"
    pydocs._write_cache(path, root, index)
    assert pydocs._read_cache(path, root) == index
    assert index == sorted(index, key=lambda e: (e.module, e.line, e.qualname))
    path.write_text("{not json")
    assert pydocs._read_cache(path, root) is None
    # one file parsed afresh gives the same entries as the index
    json_entries = [e for e in index if e.file == "json/__init__.py"]
    import ast
    tree = ast.parse((root / "json/__init__.py").read_bytes())
    assert pydocs._docstrings("json", "json/__init__.py", tree) == json_entries
