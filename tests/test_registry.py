"""Registry: lookup, close-match errors, descriptions, and third-party entry points."""

from __future__ import annotations

import textwrap

import pytest

from mmtool.errors import MMToolError
from mmtool.registry import Registry, UnknownNameError, all_registries


def test_register_get_and_describe():
    reg = Registry("widgets-test", "things for a test")

    @reg.register("round-widget")
    class Round:
        """A round widget.

        More text that is not the description.
        """

    assert reg.get("round-widget") is Round
    assert reg.describe("round-widget") == "A round widget."
    assert reg.names() == ["round-widget"]
    assert "round-widget" in reg and len(reg) == 1
    assert Round.registry_name == "round-widget"


def test_unknown_name_lists_close_matches():
    reg = Registry("gadgets-test", "things for a test")
    reg.add("spoken-digits", object(), "x")
    reg.add("digits", object(), "y")
    with pytest.raises(UnknownNameError) as err:
        reg.get("spoken-digit")
    msg = str(err.value)
    assert "did you mean 'spoken-digits'" in msg and "known: digits, spoken-digits" in msg


def test_duplicate_name_is_an_error():
    reg = Registry("dups-test", "things for a test")
    reg.add("a", object())
    with pytest.raises(MMToolError, match="registered twice"):
        reg.add("a", object())


def test_builtin_registries_are_filled():
    regs = all_registries()
    assert {"sources", "tokenizers"} <= set(regs)
    assert {"digits", "spoken-digits", "cartpole", "acrobot", "pendulum", "pydocs", "jsonl", "hf"} \
        <= set(regs["sources"].names())
    assert {"wordpiece", "bytes", "patches", "logmel", "mulaw", "raw-float", "discrete", "label"} \
        <= set(regs["tokenizers"].names())
    for reg in regs.values():  # every entry has a one-line description for `mmtool ls`
        assert all(reg.describe(n) for n in reg.names()), reg.kind


def make_plugin(root):
    """A throwaway installed distribution on `root`: a package plus dist-info with entry points."""
    pkg = root / "mmtool_demo_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        """A third-party source, registered only through an entry point."""
        import dataclasses
        from mmtool.data.schema import Field, Record
        from mmtool.data.sources.base import Source

        @dataclasses.dataclass
        class Options:
            n: int = dataclasses.field(default=5, metadata={"help": "records"})

        class Countdown(Source):
            """Countdown texts from a plug-in package."""
            Options = Options
            def __len__(self): return self.options.n
            def record_id(self, i): return f"count-{i}"
            def read(self, i):
                return Record(id=self.record_id(i), task="text",
                              fields=[Field("text", "document", f"count {self.options.n - i} to go")])
    '''))
    dist = root / "mmtool_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmtool-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmtool.sources]\ncountdown = mmtool_demo_plugin:Countdown\n")
    return root


def test_entry_point_source_works_end_to_end(tmp_path, cli):
    plugin = make_plugin(tmp_path / "site")
    env = {"PYTHONPATH": str(plugin)}
    listing = cli("ls", "sources", env=env).stdout
    assert "countdown" in listing and "Countdown texts from a plug-in package." in listing
    out = tmp_path / "out"
    cli("preprocess", "countdown", "--out", out, "--opt", "n=7", "--tokenizer", "text=bytes", env=env)
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    # "count N to go" is 13 bytes, plus BOS and EOS
    assert manifest["rows"] == 7
    assert {k: manifest["sources"]["countdown"][k] for k in ("rows", "tokens", "truncated", "chunked")} \
        == {"rows": 7, "tokens": 7 * 15, "truncated": 0, "chunked": 0}
    assert manifest["tokenizers"]["text/document"]["name"] == "bytes"
