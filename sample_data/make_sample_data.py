"""Regenerates everything in `sample_data/` deterministically (fixed seeds, fixed timestamps).

    python sample_data/make_sample_data.py            # rewrite all folders
    python sample_data/make_sample_data.py --check    # only print the folder sizes

What it writes (see sample_data/README.md):

* `spoken_digits/<word>/<voice>_s<speed>_p<pitch>.wav` + `metadata.jsonl` — the words "zero".."nine"
  spoken by espeak-ng in 10 voices, each at a speed and pitch drawn from a seeded generator,
  resampled to 16 kHz mono 16-bit PCM, silence trimmed.
* `images/<class>/*.png` — `imagefolder` layout: sklearn's handwritten digits (8x8) upscaled to 32x32.
* `audio/<class>/*.wav` — `audiofolder` layout: a few clips copied from spoken_digits.
* `jsonl/records.jsonl` (+ `media/`, `episodes/`) — a mixed-modality manifest: text, image+caption,
  audio+transcript, CartPole/Pendulum trajectories inline and as `.npz`.
* `jsonl/bad_records.jsonl` (+ `bad/`) — one line per kind of bad input, for rejection tests.

Requirements: `espeak-ng` on PATH (only this script needs it; tests read the committed files),
numpy, scipy, pillow, scikit-learn, gymnasium. Output bytes depend on the espeak-ng version
(here 1.51) but not on the run.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import tempfile
import wave
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20240607
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("en", "en-us", "en+f3", "en+m3", "en+f2", "en-gb-scotland", "en-029", "en-gb-x-rp",
          "en-us-nyc", "en+klatt")
SPEEDS = (120, 140, 160, 180, 200)  # words per minute
PITCHES = (25, 40, 50, 60, 75)  # espeak-ng 0..99
RATE = 16000


# -- helpers --------------------------------------------------------------------------------------

def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    """Writes float samples in [-1, 1] as 16-bit mono PCM."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez, but with fixed zip timestamps so that the bytes do not change between runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def write_jsonl(path: Path, rows: list) -> None:
    """Writes rows (dicts, or raw `bytes` lines written as they are) one per line."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")


def clean(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# -- spoken digits --------------------------------------------------------------------------------

def synthesize(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng → 22.05 kHz WAV → float32 16 kHz, leading/trailing silence trimmed."""
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        subprocess.run(["espeak-ng", "-w", str(out), "-v", voice, "-s", str(speed), "-p", str(pitch),
                        word], check=True, capture_output=True)
        with wave.open(str(out), "rb") as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2, "espeak-ng writes 16-bit mono"
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768.0
    g = np.gcd(RATE, rate)
    y = resample_poly(x, RATE // g, rate // g)
    loud = np.flatnonzero(np.abs(y) > 0.01 * np.abs(y).max())
    pad = RATE // 50  # keep 20 ms around the speech
    y = y[max(loud[0] - pad, 0): loud[-1] + pad]
    return (y / max(1.0, np.abs(y).max() / 0.99)).astype(np.float32)


def make_spoken_digits(rng: np.random.Generator) -> None:
    root = clean(HERE / "spoken_digits")
    meta = []
    for label, word in enumerate(WORDS):
        for voice in VOICES:
            speed, pitch = int(rng.choice(SPEEDS)), int(rng.choice(PITCHES))
            rel = f"{word}/{voice}_s{speed}_p{pitch}.wav"
            write_wav(root / rel, synthesize(word, voice, speed, pitch))
            meta.append({"file": rel, "word": word, "label": label, "voice": voice,
                         "speed": speed, "pitch": pitch})
    write_jsonl(root / "metadata.jsonl", meta)


def make_audiofolder() -> None:
    """`audiofolder` layout: 3 clips each of "zero" and "one", copied from spoken_digits."""
    root = clean(HERE / "audio")
    for word in ("zero", "one"):
        for src in sorted((HERE / "spoken_digits" / word).glob("*.wav"))[:3]:
            (root / word).mkdir(exist_ok=True)
            shutil.copyfile(src, root / word / src.name)


# -- images ---------------------------------------------------------------------------------------

def digit_image(pixels8x8: np.ndarray, size: int = 32) -> "Image.Image":
    """sklearn digit (values 0..16, 8x8) → 8-bit grayscale upscaled with bilinear filtering."""
    from PIL import Image

    im = Image.fromarray(np.round(pixels8x8 * (255 / 16)).astype(np.uint8), "L")
    return im.resize((size, size), Image.BILINEAR)


def make_imagefolder(digits) -> None:
    root = clean(HERE / "images")
    for cls in (0, 1):
        (root / str(cls)).mkdir()
        for k, i in enumerate(np.flatnonzero(digits.target == cls)[:4]):
            digit_image(digits.images[i]).save(root / str(cls) / f"digit{cls}_{k}.png", optimize=True)


# -- jsonl manifest -------------------------------------------------------------------------------

def cartpole_episode(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CartPole-v1 episode under a noisy "push toward the pole's lean" policy."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    o, a, r = [], [], []
    for _ in range(steps):
        act = int(obs[2] + 0.5 * obs[3] > 0) if rng.random() > 0.2 else int(rng.integers(2))
        o.append(obs)
        a.append(act)
        obs, rew, term, trunc, _ = env.step(act)
        r.append(rew)
        if term or trunc:
            break
    env.close()
    return np.asarray(o, np.float32), np.asarray(a, np.int64), np.asarray(r, np.float32)


def pendulum_episode(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Pendulum-v1 episode with seeded random torques (continuous actions)."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    o, a, r = [], [], []
    for _ in range(steps):
        act = env.action_space.sample()
        o.append(obs)
        a.append(act)
        obs, rew, *_ = env.step(act)
        r.append(rew)
    env.close()
    return np.asarray(o, np.float32), np.asarray(a, np.float32), np.asarray(r, np.float32)


def r4(a: np.ndarray) -> list:
    """Rounds to 4 decimals for a readable manifest."""
    return np.round(a.astype(np.float64), 4).tolist()


def make_jsonl(digits) -> None:
    from PIL import Image

    root = clean(HERE / "jsonl")
    media = root / "media"
    media.mkdir()
    # Coloured digits (RGB) for image+caption records.
    colours = {3: (230, 60, 40), 5: (40, 120, 230), 8: (40, 170, 80)}
    for cls, rgb in colours.items():
        g = np.asarray(digit_image(digits.images[np.flatnonzero(digits.target == cls)[0]]), np.float32)
        rgb_img = (g[..., None] / 255.0 * np.asarray(rgb, np.float32)).round().astype(np.uint8)
        Image.fromarray(rgb_img, "RGB").save(media / f"digit{cls}.png", optimize=True)
    for word, voice in (("seven", "en-us"), ("two", "en+f3")):
        src = next((HERE / "spoken_digits" / word).glob(f"{voice}_s*.wav"))
        shutil.copyfile(src, media / f"{word}.wav")
    o, a, r = cartpole_episode(seed=1, steps=40)
    save_npz(root / "episodes" / "ep0.npz", observations=o, actions=a, rewards=r)
    o1, a1, r1 = cartpole_episode(seed=2, steps=6)
    o2, a2, r2 = pendulum_episode(seed=3, steps=5)

    records = [
        {"id": "doc-hello", "text": "Unified multimodal transformers read text, images, audio and actions as one token stream."},
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"id": "cap-3", "image": "media/digit3.png", "text": "a red handwritten digit three", "label": 3},
        {"id": "cap-5", "image": "media/digit5.png", "text": "a blue handwritten digit five", "label": 5},
        {"id": "img-8", "image": "media/digit8.png", "label": 8},
        {"id": "asr-seven", "audio": "media/seven.wav", "text": "seven", "label": 7},
        {"id": "asr-two", "audio": "media/two.wav", "text": "two", "label": 2, "task": "speech"},
        {"id": "cartpole-inline", "task": "control/cartpole", "observations": r4(o1),
         "actions": a1.tolist(), "rewards": r1.tolist(), "num_actions": 2},
        {"id": "pendulum-inline", "task": "control/pendulum", "observations": r4(o2),
         "actions": r4(a2), "rewards": r4(r2)},
        {"id": "cartpole-npz", "task": "control/cartpole", "trajectory": "episodes/ep0.npz",
         "num_actions": 2},
        {"id": "qa-1", "task": "qa", "text": "Q: how many digits are there? A: ten, zero to nine."},
        {"id": "vqa-3", "image": "media/digit3.png", "text": "Which digit is this? Three.", "task": "vqa",
         "label": 3},
    ]
    write_jsonl(root / "records.jsonl", records)

    # One line per kind of bad input; tests expect each to be rejected with its line number.
    bad = root / "bad"
    bad.mkdir()
    png = (media / "digit3.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    noise = np.random.default_rng(SEED).integers(0, 256, 600, np.uint8)
    (bad / "garbage.wav").write_bytes(noise.tobytes())
    # 5000x5000 = 25M pixels > the default max_pixels (4096*4096); 1-bit black compresses to a few KB.
    Image.new("1", (5000, 5000), 0).save(bad / "huge.png", optimize=True)
    save_npz(bad / "bad_actions.npz", observations=np.zeros((3, 2), np.float32),
             actions=np.zeros(2, np.int64))
    rows = [
        b'{"id": "bad-json", "text": "an unterminated string}',
        {"id": "bad-missing-image", "image": "media/does_not_exist.png", "text": "missing"},
        {"id": "bad-truncated-png", "image": "bad/truncated.png", "text": "half a PNG"},
        {"id": "bad-garbage-wav", "audio": "bad/garbage.wav", "text": "noise"},
        {"id": "bad-empty-text", "text": ""},
        b'{"id": "bad-nan", "observations": [[0.1, NaN], [0.2, 0.3]], "actions": [0, 1]}',
        {"id": "bad-ragged", "observations": [[0.1, 0.2], [0.3]], "actions": [0, 1]},
        b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',
        {"id": "bad-huge-image", "image": "bad/huge.png", "text": "all black"},
        {"id": "bad-no-modality", "foo": 1, "bar": "baz"},
        {"id": "bad-length-mismatch", "trajectory": "bad/bad_actions.npz"},
    ]
    write_jsonl(root / "bad_records.jsonl", rows)


def folder_sizes() -> None:
    total = 0
    for sub in sorted(p for p in HERE.iterdir() if p.is_dir()):
        files = [f for f in sub.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        total += size
        print(f"{sub.name:15s} {len(files):4d} files {size / 1024:8.1f} KiB")
    print(f"{'total':15s}            {total / 1024:8.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only print folder sizes")
    args = parser.parse_args()
    if not args.check:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("espeak-ng is needed to synthesize spoken_digits (apt install espeak-ng)")
        from sklearn.datasets import load_digits

        digits = load_digits()
        make_spoken_digits(np.random.default_rng(SEED))
        make_audiofolder()
        make_imagefolder(digits)
        make_jsonl(digits)
    folder_sizes()


if __name__ == "__main__":
    main()
