"""`conversations`: LLaVA arrays and ShareGPT JSON lines, checked by the content of the written samples.

Fixtures are format-faithful copies built in `tmp_path`: a LLaVA-Instruct style JSON array (an
`<image>` in the middle of a human turn, a text-only record, a record without turns, an unknown
speaker) and a ShareGPT style JSONL (`messages` with `role`/`content`, a system turn, a bad line).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from mmtool.data.preprocess import PreprocessConfig, preprocess
from mmtool.data.schema import rows_to_samples
from mmtool.data.shards import read_folder
from mmtool.data.sources import build_source
from mmtool.data.tokenizers import build_tokenizer
from mmtool.errors import MMToolError, RecordError

QUESTION = "Look at this picture:\n<image>\nWhat Animal is on the SOFA?\nAnswer briefly."
ANSWER = "A Cat.\n\nIt is asleep."
LLAVA = [
    {"id": "000000033471", "image": "coco/cat.png",
     "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER},
                       {"from": "human", "value": "And its colour?"},
                       {"from": "gpt", "value": "Grey, with\tstripes."}]},
    {"id": "text-only-7", "conversations": [{"from": "human", "value": "Say hi in French."},
                                            {"from": "gpt", "value": "Salut !"}]},
    {"id": "no-turns", "image": "coco/cat.png", "conversations": []},
    {"id": "odd-speaker", "conversations": [{"from": "narrator", "value": "Once upon a time"}]},
    {"id": 42, "image": "coco/cat.png", "source": "vg",
     "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Stripes."}]},
]
SHAREGPT = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
     "model": "gpt-4"},
    {"conversations": [{"from": "human", "value": "Line one\nLine TWO"},
                       {"from": "gpt", "value": "Got both lines."}]},
]


@pytest.fixture
def llava(tmp_path):
    (tmp_path / "coco").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "coco" / "cat.png")
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps(LLAVA, indent=2))
    return path, pixels


@pytest.fixture
def sharegpt(tmp_path):
    path = tmp_path / "sharegpt.jsonl"
    lines = [json.dumps(SHAREGPT[0]), "", json.dumps(SHAREGPT[1]), '{"messages": [oops']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_llava_array_turns_roles_and_image_where_the_placeholder_stands(llava):
    path, pixels = llava
    src = build_source("conversations", [f"path={path}"])
    assert src.layout == "array" and len(src) == 5
    rec = src.read(0)
    assert rec.id == "000000033471" and rec.task == "image+conversation"
    assert [(f.modality, f.role) for f in rec.fields] == [
        ("text", "user"), ("image", "image"), ("text", "user"), ("text", "assistant"),
        ("text", "user"), ("text", "assistant")]
    texts = [f.data for f in rec.fields if f.modality == "text"]
    assert texts == ["Look at this picture:", "What Animal is on the SOFA?\nAnswer briefly.", ANSWER,
                     "And its colour?", "Grey, with\tstripes."]
    assert np.array_equal(rec.fields[1].data, pixels)
    assert rec.meta == {"turns": ["user", "assistant", "user", "assistant"]}
    text_only = src.read(1)
    assert text_only.task == "conversation" and [f.role for f in text_only.fields] == ["user", "assistant"]
    # no placeholder: the image goes first (LLaVA's convention); other keys are meta, never text
    rec4 = src.read(4)
    assert rec4.id == "42" and [f.modality for f in rec4.fields] == ["image", "text", "text"]
    assert rec4.meta["source"] == "vg" and "vg" not in [f.data for f in rec4.fields if f.modality == "text"]


def test_records_without_turns_or_with_unknown_speakers_are_rejected_by_index(llava):
    src = build_source("conversations", [f"path={llava[0]}"])
    with pytest.raises(RecordError, match=r"llava_instruct\.json#2: no turns: expected a non-empty "
                                          r"'conversations' or 'messages' list"):
        src.read(2)
    with pytest.raises(RecordError, match=r"#3: turn 0: unknown speaker 'narrator'"):
        src.read(3)


def test_sharegpt_jsonl_is_detected_and_kept_in_order(sharegpt):
    src = build_source("conversations", [f"path={sharegpt}"])
    assert src.layout == "jsonl" and len(src) == 3  # the blank line is no record
    rec = src.read(0)
    assert rec.id == "0" and rec.meta["model"] == "gpt-4"
    assert [(f.role, f.data) for f in rec.fields] == [
        ("system", "You are terse."), ("user", "Name a prime."), ("assistant", "Seven.")]
    assert [(f.role, f.data) for f in src.read(1).fields] == [
        ("user", "Line one\nLine TWO"), ("assistant", "Got both lines.")]
    with pytest.raises(RecordError, match=r"sharegpt\.jsonl:4: invalid JSON"):
        src.read(2)


def test_preprocess_writes_the_turn_texts_and_the_image_exactly(llava, tmp_path):
    path, pixels = llava
    out = tmp_path / "out"
    preprocess(PreprocessConfig(source="conversations", out=out, options=[f"path={path}"],
                                tokenizers=["text=bytes"], overwrite=True, max_rejected=0.5))
    samples = {s.id: s for s in rows_to_samples(read_folder(out))}
    assert set(samples) == {"000000033471", "text-only-7", "42"}  # ids are the input's
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["location"].rsplit("#", 1)[1] for r in rejected) == ["2", "3"]
    text, patches = build_tokenizer("bytes"), build_tokenizer("patches")
    s = samples["000000033471"]
    assert [(g.modality, g.role) for g in s.segments] == [
        ("text", "user"), ("image", "image"), ("text", "user"), ("text", "assistant"),
        ("text", "user"), ("text", "assistant")]
    decoded = [text.decode(g) for g in s.segments if g.modality == "text"]
    assert decoded[0] + "\n<image>\n" + decoded[1] == QUESTION  # the placeholder stood between them
    assert decoded[2:] == [ANSWER, "And its colour?", "Grey, with\tstripes."]
    image = patches.decode(s.segments[1])
    assert image.shape == pixels.shape and np.abs(image.astype(int) - pixels).max() <= 1


def test_default_wordpiece_loses_case_and_newlines(sharegpt, tmp_path):
    """What the README says the default text tokenizer does to conversations."""
    out = tmp_path / "wp"
    preprocess(PreprocessConfig(source="conversations", out=out, options=[f"path={sharegpt}"],
                                overwrite=True, max_rejected=0.5))
    samples = {s.id: s for s in rows_to_samples(read_folder(out))}
    wp = build_tokenizer("wordpiece")
    assert wp.decode(samples["1"].segments[0]) == "line one line two"


def test_image_paths_are_confined_to_image_root(llava, tmp_path):
    path, _ = llava
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside)
    bad = tmp_path / "escape.json"
    bad.write_text(json.dumps([{"image": f"../{outside.name}",
                                "conversations": [{"from": "human", "value": "<image>"}]}]))
    src = build_source("conversations", [f"path={bad}"])
    with pytest.raises(RecordError, match="outside"):
        src.read(0)
    assert src.input_files() == [bad]  # the content key never reads outside the data root either
    ok = build_source("conversations", [f"path={bad}", f"image_root={tmp_path.parent}"])
    assert [f.modality for f in ok.read(0).fields] == ["image"]
    assert build_source("conversations", [f"path={path}"]).record_files(0) == [tmp_path / "coco" / "cat.png"]


def test_placeholder_count_mismatch_and_bad_files(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image> and <image>"}]}]))
    with pytest.raises(RecordError, match=r"2 <image> placeholder\(s\) but 0 image\(s\)"):
        build_source("conversations", [f"path={path}"]).read(0)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []},\n {"id": ')
    with pytest.raises(MMToolError, match=r"broken\.json: invalid JSON at line 2"):
        build_source("conversations", [f"path={broken}"])
    with pytest.raises(MMToolError, match="needs --opt path"):
        build_source("conversations", [])


def test_role_prefix_and_the_mapping_of_every_key(llava):
    src = build_source("conversations", [f"path={llava[0]}", "role_prefix=true"])
    assert [f.data for f in src.read(1).fields] == ["user: Say hi in French.", "assistant: Salut !"]
    rows = {r[0]: r[1:] for r in src.mapping_rows()}
    assert {k: v[0] for k, v in rows.items()} == {
        "id": "id", "image": "image", "conversations": "text", "source": "meta"}
    assert rows["image"] == ("image", "image", "where <image> stands, else before the first turn; "
                             f"paths under {llava[0].parent}; in 3 of the first 5 records")
    assert rows["conversations"][1] == "user, assistant, system or tool (from from/role)"
    assert rows["conversations"][2].endswith("case and newlines as written, after 'ROLE: '")
    assert "id → id: else the record's index" in src.describe_mapping()
    sharegpt = llava[0].parent / "extra.jsonl"
    sharegpt.write_text(json.dumps({"messages": [{"role": "user", "content": "x", "weight": 0}],
                                        "model": "m"}) + "\n")
    rows = build_source("conversations", [f"path={sharegpt}"]).mapping_rows()
    assert ("(record index)", "id", "", "no id key") in rows
    assert ("model", "meta", "", "copied, never text") in rows
    assert ("turn.weight", "ignored", "", "only from/role and value/content are read") in rows


def test_cli_preprocess_then_train_two_steps_on_assistant_turns(llava, tmp_path, cli):
    path, _ = llava
    data, run = tmp_path / "data", tmp_path / "run"
    proc = cli("preprocess", "conversations", "--opt", f"path={path}", "--tokenizer", "text=bytes",
               "--max-rejected", "0.5", "--out", data)
    assert "rejected 2" in proc.stdout
    cli("train", "--data", data, "--out", run, "--model", "tiny", "--max-steps", "2",
        "--batch-tokens", "4096", "--num-workers", "0", "--objectives", "chat", "--splits",
        "train,validation,test")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert all(set(s["losses"]) == {"chat"} and s["by_stream"].keys() == {"chat/text:bytes"}
               for s in steps if "loss" in s)


def test_an_edited_image_or_turn_rebuilds_the_folder_with_the_new_content(llava, tmp_path):
    """Content keys: the file and the images its records name are inputs; record 0's key changes
    with its image, record 1's does not (it names none); a rerun writes the new pixels and text."""
    from mmtool.data.inputs import file_table, part_key

    path, pixels = llava
    src = pickle.loads(pickle.dumps(build_source("conversations", [f"path={path}"])))  # workers
    image = tmp_path / "coco" / "cat.png"
    assert src.input_files() == [path, image]  # records 0, 2 and 4 name it: listed once
    table = file_table(src.input_files())
    before = [part_key(src, [i], table) for i in (0, 1)]
    Image.fromarray(255 - pixels).save(image)
    after = file_table(src.input_files(), table)
    assert part_key(src, [0], after) != before[0] and part_key(src, [1], after) == before[1]

    out = tmp_path / "keyed"
    job = dict(source="conversations", out=out, options=[f"path={path}"], tokenizers=["text=bytes"],
               max_rejected=0.5)
    preprocess(PreprocessConfig(**job))
    path.write_text(json.dumps(LLAVA, indent=2).replace("Salut !", "Bonjour !"))
    Image.fromarray(pixels).save(image)
    m = preprocess(PreprocessConfig(**job))
    assert not m["up_to_date"]
    samples = {s.id: s for s in rows_to_samples(read_folder(out))}
    text, patches = build_tokenizer("bytes"), build_tokenizer("patches")
    assert text.decode(samples["text-only-7"].segments[1]) == "Bonjour !"
    assert np.abs(patches.decode(samples["000000033471"].segments[1]).astype(int) - pixels).max() <= 1


def test_jsonl_source_refuses_a_llava_array_and_names_this_source(llava):
    """The issue's symptom: a LLaVA array read line by line had every record rejected."""
    with pytest.raises(MMToolError, match="a JSON array, not JSON lines; for LLaVA / ShareGPT "
                                          "conversations use `mmtool preprocess conversations"):
        build_source("jsonl", [f"path={llava[0]}"])


def test_openai_style_content_parts_place_the_image_part(llava, tmp_path):
    path = tmp_path / "openai.jsonl"
    path.write_text(json.dumps({"id": "oa-1", "images": ["coco/cat.png"], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"},
                                     {"type": "text", "text": " Be short."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}) + "\n")
    rec = build_source("conversations", [f"path={path}"]).read(0)
    assert [(f.modality, f.role, f.data if f.modality == "text" else f.data.shape) for f in rec.fields] == [
        ("text", "user", "What is this?"), ("image", "image", (20, 32, 3)), ("text", "user", " Be short."),
        ("text", "assistant", "A cat.")]


def test_mapping_rows_become_the_mapping_report_api(llava):
    """`mapping()` speaks the mapping-report API (`base.MappingRow`)."""
    from mmtool.data.sources import base

    src = build_source("conversations", [f"path={llava[0]}"])
    rows = src.mapping()
    assert [(r.input, r.target, r.role, r.note) for r in rows] == src.mapping_rows()
    assert all(r.target in base.MAPPING_TARGETS for r in rows)
