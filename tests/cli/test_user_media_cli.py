"""Images and audio as users have them, through the real CLI: a JSONL of mixed JPEG/PNG/grayscale/
alpha/palette photos preprocesses to one 3-channel stream under the token cap and trains; FLAC and
float WAV clips give the int16 WAV's tokens; `mmtool ls tokenizers -v` lists every option."""

from __future__ import annotations

import inspect
import json
import wave

import numpy as np
from PIL import Image

from mmtool.config import parse_value
from mmtool.data import shards as store
from mmtool.data.schema import rows_to_samples
from mmtool.data.sources.base import SAMPLE_DATA
from mmtool.data.tokenizers import TOKENIZERS, build_tokenizer
from mmtool.data.tokenizers.image import Patches, capped_grid


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


def _image_folder(root) -> list[dict]:
    """Seven real-sized images in five modes and three formats, and their JSONL records."""
    china, flower = _photos()
    files = {
        "china.jpg": (china.resize((640, 480)), "JPEG"),
        "flower-wide.jpg": (flower.resize((800, 450)), "JPEG"),
        "china-gray.jpg": (china.convert("L"), "JPEG"),
        "flower.png": (flower.resize((320, 240)), "PNG"),
        "flower-rgba.png": (flower.resize((200, 300)).convert("RGBA"), "PNG"),
        "china-palette.png": (china.resize((160, 120)).quantize(32), "PNG"),
        "thumb-gray.png": (flower.resize((40, 24)).convert("L"), "PNG"),
    }
    (root / "img").mkdir()
    records = []
    for i, (name, (im, fmt)) in enumerate(files.items()):
        im.save(root / "img" / name, fmt)
        records.append({"id": f"photo-{i}", "image": f"img/{name}", "text": f"a photo called {name[:-4]}",
                        "size": im.size})
    with open(root / "photos.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "size"}) + "\n")
    return records


def test_mixed_images_preprocess_to_one_stream_under_the_cap_and_train(cli, tmp_path):
    records = _image_folder(tmp_path)
    out = tmp_path / "data"
    cli("preprocess", "jsonl", "--opt", f"path={tmp_path / 'photos.jsonl'}", "--out", out, "--tokenizer", "text=bytes")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == 0 and manifest["rows"] == len(records)
    conf = next(c for k, c in manifest["tokenizers"].items() if k.startswith("image/"))
    assert conf["max_tokens"] == 256 and conf["patch_size"] == 4
    samples = {s.id: s for s in rows_to_samples(store.read_folder(out))}
    assert set(samples) == {r["id"] for r in records}  # ids are the input's
    tok = Patches()
    for r in records:
        segs = {seg.modality: seg for seg in samples[r["id"]].segments}
        w, h = r["size"]
        assert segs["image"].shape == (*capped_grid(h, w, 4, 256), 48)  # every mode: 3 channels
        text = bytes(int(i) for i in segs["text"].ids if i < 256).decode()
        assert text == r["text"]
        pixels = tok.decode(segs["image"])
        assert pixels.shape[2] == 3 and pixels.shape[0] * pixels.shape[1] <= 256 * 16
    shapes = {r["id"]: samples[r["id"]].segments[0].shape for r in records}
    assert shapes["photo-0"] == (14, 18, 48)  # 640×480 → 56×72 pixels, the documented size
    assert shapes["photo-6"] == (6, 10, 48)  # 40×24 thumbnail: below the cap, kept (not enlarged)
    gray = tok.decode(samples["photo-2"].segments[0])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    cli("train", "--data", out, "--out", tmp_path / "run", "--model", "tiny", "--max-steps", "1",
        "--batch-tokens", "2048", "--num-workers", "0")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 1 and np.isfinite(m.get("loss", np.nan)) for m in metrics)


def test_flac_and_float_wav_give_the_int16_wavs_tokens(cli, tmp_path):
    import soundfile

    wav = sorted((SAMPLE_DATA / "spoken_digits" / "seven").glob("*.wav"))[0]
    with wave.open(str(wav)) as w:
        ints, sr = np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "int16.wav").write_bytes(wav.read_bytes())
    soundfile.write(tmp_path / "a" / "clip.flac", ints, sr, subtype="PCM_16")
    soundfile.write(tmp_path / "a" / "float.wav", ints / np.float32(32768), sr, subtype="FLOAT")
    stereo = np.stack([ints, ints], axis=1).astype(np.float64) / 32768  # [n, 2], mixes to the same mono
    soundfile.write(tmp_path / "a" / "stereo.ogg", stereo, sr, format="OGG", subtype="VORBIS")
    lines = [{"id": n, "audio": f"a/{n}", "text": "seven"}
             for n in ("int16.wav", "clip.flac", "float.wav", "stereo.ogg")]
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "data"
    cli("preprocess", "jsonl", "--opt", f"path={tmp_path / 'clips.jsonl'}", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == 0 and manifest["rows"] == 4
    audio = {s.id: next(g for g in s.segments if g.modality == "audio").values
             for s in rows_to_samples(store.read_folder(out))}
    assert np.array_equal(audio["clip.flac"], audio["int16.wav"])
    assert np.array_equal(audio["float.wav"], audio["int16.wav"])
    assert audio["stereo.ogg"].shape == audio["int16.wav"].shape  # lossy, same length
    assert np.mean(np.abs(audio["stereo.ogg"] - audio["int16.wav"])) < 0.1


def test_ls_tokenizers_verbose_lists_every_constructor_option(cli):
    listing = cli("ls", "tokenizers", "-v", env={"COLUMNS": "1000"}).stdout
    for name in TOKENIZERS.names():
        cls = TOKENIZERS.get(name)
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        given = {}
        for p in params:
            prefix = f"--tokenizer {cls.modality}={name}:{p.name}="
            line = next((ln for ln in listing.splitlines() if prefix in ln), None)
            assert line is not None, f"{name}: option {p.name} not listed"
            default, _, help_text = line.split(prefix, 1)[1].partition("  ")
            assert help_text.strip(), f"{name}: option {p.name} has no help"
            given[p.name] = parse_value(default)
        assert build_tokenizer(name, **given).config() == build_tokenizer(name).config()  # defaults as listed
    assert "--tokenizer image=patches:max_tokens=256" in listing
    assert "--tokenizer image=patches:short_side=none" in listing
