"""`spoken-digits`: the words "zero".."nine" as speech clips with their transcripts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmtool.data import media
from mmtool.data.schema import Field, Record
from mmtool.data.sources.base import SAMPLE_DATA, SOURCES, Source
from mmtool.errors import MMToolError, RecordError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NAME = re.compile(r"^(?P<voice>.+)_s(?P<speed>\d+)_p(?P<pitch>\d+)$")


@dataclass
class SpokenDigitsOptions:
    root: Path = field(default=SAMPLE_DATA / "spoken_digits", metadata={
        "help": "folder laid out as <word>/<name>.wav (word = zero..nine), with an optional "
                "metadata.jsonl (file, word, label, voice, speed, pitch per line); "
                "default: the bundled espeak-ng clips"})


@SOURCES.register("spoken-digits")
class SpokenDigits(Source):
    """Spoken digit words (16 kHz WAV) with transcript and label 0-9; bundled clips by default.

    Each record is `audio/speech` then `text/transcript`, label = the digit, task "speech", and
    meta {voice, speed, pitch, file}. Without metadata.jsonl the folder is scanned and voice/speed/
    pitch are parsed from names like `en-us_s160_p50.wav` (None when the name has another form).
    """

    Options = SpokenDigitsOptions

    def __init__(self, options: SpokenDigitsOptions, split: str = "all"):
        super().__init__(options, split)
        self.root = Path(options.root)
        if not self.root.is_dir():
            raise MMToolError(f"--opt root={self.root}: no such folder")
        meta_path = self.root / "metadata.jsonl"
        self.entries = self._read_metadata(meta_path) if meta_path.is_file() else self._scan()
        if not self.entries:
            raise MMToolError(f"--opt root={self.root}: no <word>/*.wav clips found "
                              f"(word = {', '.join(WORDS)})")

    def _read_metadata(self, path: Path) -> list[dict]:
        entries = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                word = e["word"]
                file = e["file"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MMToolError(f"{path}:{n}: expected a JSON object with file and word ({exc})") \
                    from None
            if word not in WORDS:
                raise MMToolError(f"{path}:{n}: word {word!r} is not one of {', '.join(WORDS)}")
            entries.append({"file": file, "word": word, "voice": e.get("voice"),
                            "speed": e.get("speed"), "pitch": e.get("pitch")})
        return entries

    def _scan(self) -> list[dict]:
        entries = []
        for word in WORDS:
            for wav in sorted((self.root / word).glob("*.wav")):
                m = _NAME.match(wav.stem)
                entries.append({
                    "file": f"{word}/{wav.name}", "word": word,
                    "voice": m["voice"] if m else None,
                    "speed": int(m["speed"]) if m else None,
                    "pitch": int(m["pitch"]) if m else None,
                })
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def record_id(self, index: int) -> str:
        return self.entries[index]["file"].removesuffix(".wav")

    def input_files(self) -> list[Path]:
        meta = self.root / "metadata.jsonl"
        return ([meta] if meta.is_file() else []) + [self.root / e["file"] for e in self.entries]

    def record_files(self, index: int) -> list[Path]:
        return [self.root / self.entries[index]["file"]]

    def record_key(self, index: int) -> bytes:
        return json.dumps(self.entries[index], sort_keys=True).encode()

    def location(self, index: int) -> str:
        return str(self.root / self.entries[index]["file"])

    def read(self, index: int) -> Record:
        e = self.entries[index]
        try:
            audio = media.load_audio(self.root / e["file"])
        except RecordError as err:
            raise err.at(self.location(index))
        return Record(
            id=self.record_id(index),
            task="speech",
            fields=[Field("audio", "speech", audio), Field("text", "transcript", e["word"])],
            label=WORDS.index(e["word"]),
            meta={"voice": e["voice"], "speed": e["speed"], "pitch": e["pitch"], "file": e["file"]},
        )
