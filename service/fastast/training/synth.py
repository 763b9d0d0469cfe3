"""A synthetic Speech Commands V2: the 35 keywords spoken by TTS engines, so a keyword model trains offline.

An espeak-ng speaker is a voice (an English accent, or another language reading the English word) plus a
variant (the timbre). Val and test each get voices *and* variants that no other split uses, so a test
speaker's accent and timbre are never heard in training. flite's and festival's voices (recorded people,
closer to real speech than espeak-ng's formants, but only seven of them) speak a share of the training clips
only, pitch-shifted by sox for timbre: val and test stay espeak-ng, comparable whatever engines trained.
Every clip is planned up front from its own seeded numpy Generator and rendered on its own, so a seed gives
byte-identical files however the thread pool schedules the TTS calls.

Layout of the output folder: `labels.csv` (AST label CSV), `train.json`, `val.json`, `test.json` (AST
manifests whose wav paths are relative to the manifest's folder), `speakers.json`, and the clips as
`<split>/<word>/<nnnn>.wav` (16 kHz mono 16-bit, exactly one second).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from fastast.audio import load_audio
from fastast.model.card import bundled_labels
from fastast.training.data import DataError, Example, write_manifest

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # one second, as in Speech Commands
SPLITS = ("train", "val", "test")
HELDOUT_FRACTION = 0.1  # of each word's clips, for val and again for test
PITCH = (25, 75)  # espeak-ng -p (0..99)
SPEED = (100, 180)  # espeak-ng -s, words per minute
MAX_SPEED = 450  # espeak-ng's fastest
AMPLITUDE = (60, 140)  # espeak-ng -a (its default is 100)
SNR_DB = (5.0, 30.0)
NOISE_SLOPES = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # noise power falls as 1/f**slope
SILENCE_DB = -40.0  # 5 ms frames this far below the loudest one are espeak-ng's padding
PEAK = 0.99  # a louder mix is scaled down (speech and noise alike, so the SNR holds)
ENGLISH_SHARE = 0.5  # of each split's espeak-ng clips spoken by an English voice; accents speak the rest
ENGINES = ("espeak-ng", "flite", "festival")
# Voices of the other engines (Debian packages flite, festival, festvox-kallpc16k, festvox-kdlpc16k,
# festvox-us-slt-hts): five people, two of them in two engines. flite's kal (8 kHz) and awb_time are left out.
ENGINE_VOICES = {
    "flite": ("kal16", "awb", "rms", "slt"),
    "festival": ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"),
}
ENGINE_SHARE = 1 / 3  # of the training clips spoken by flite and festival voices, when they are used
WORDS_PER_MINUTE = 140  # a flite/festival voice's own pace as an espeak-ng speed: sox tempo = speed / this
CENTS_PER_PITCH_STEP = 12  # espeak-ng pitch 25..75 -> a sox pitch shift of -300..+300 cents for other engines
# Other languages' voices that read the English words as accented English: Latin-script rules, no spelling
# out letter by letter, words under a second at 120 wpm (cmn reads Latin text as English, Mandarin-voiced).
ACCENT_VOICES = frozenset(
    "af cmn cs cy da de eo et fi fr-fr ga hr hu id is it lv nb nl pl pt pt-br ro sk sv".split()
)
# Variants that do not sound like a person (robots, effects) or that espeak-ng marks unstable.
EXCLUDED_VARIANTS = frozenset(
    {"fast", "Demonic", "announcer", "UniRobot", "anikaRobot", "robosoft", *(f"robosoft{i}" for i in range(2, 9))}
)
_VARIANT_FILE = re.compile(r"!v/(\S+(?: \S+)*?)(?: {2,}|\s*$)")


@dataclass(frozen=True, order=True)
class Speaker:
    voice: str  # an espeak-ng language code, or ENGINE:VOICE for the other engines (flite:slt)
    variant: str = ""  # an espeak-ng variant; "" is the voice's own timbre

    @property
    def name(self) -> str:
        """The espeak-ng -v argument, e.g. en-gb-scotland+f2, or the voice of another engine, e.g. flite:slt."""
        return f"{self.voice}+{self.variant}" if self.variant else self.voice

    @property
    def engine(self) -> str:
        return self.voice.split(":")[0] if ":" in self.voice else "espeak-ng"

    @property
    def english(self) -> bool:
        return self.voice.startswith("en") or self.engine != "espeak-ng"


@dataclass(frozen=True)
class Utterance:
    """Every choice behind one clip: rendering it needs nothing else, which keeps the pool deterministic."""

    split: str
    path: str  # relative to the data set folder
    mid: str
    word: str
    speaker: Speaker
    pitch: int
    speed: int
    amplitude: int
    noise: str  # a key of NOISE_SLOPES
    snr_db: float
    position: float  # the word's start within the free part of the window, 0..1
    noise_seed: int


@dataclass(frozen=True)
class Clip:
    wave: np.ndarray  # float32 [CLIP_SAMPLES]
    onset: int  # the word's first sample
    offset: int  # one past its last sample


def _run(program: str, *args: str, stdin: bytes | None = None) -> bytes:
    """A TTS or sox call's stdout; a missing program or a failure is a DataError naming it."""
    try:
        done = subprocess.run([program, *args], input=stdin, capture_output=True, check=False)
    except FileNotFoundError:
        raise DataError(f"{program} is not installed (apt-get install {program})") from None
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise DataError(f"{program} {' '.join(args)} failed: {reason}")
    return done.stdout


def _espeak(*args: str) -> bytes:
    return _run("espeak-ng", *args)


def espeak_voices() -> list[str]:
    """Language codes of the installed voices (second column of `espeak-ng --voices`)."""
    rows = [line.split() for line in _espeak("--voices").decode().splitlines()[1:]]
    return [row[1] for row in rows if len(row) > 1]


def espeak_variants() -> list[str]:
    """Ids of the installed variants (what follows `!v/` in `espeak-ng --voices=variant`), spaces excluded."""
    ids = (_VARIANT_FILE.search(line) for line in _espeak("--voices=variant").decode().splitlines()[1:])
    return [m[1] for m in ids if m and " " not in m[1]]


def engine_speakers(engines: tuple[str, ...]) -> list[Speaker]:
    """The flite and festival voices among `engines`; a DataError if an engine or one of its voices is missing."""
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise DataError(f"unknown TTS engine {sorted(unknown)[0]!r}; choose from {', '.join(ENGINES)}")
    speakers = []
    for engine in ENGINE_VOICES.keys() & set(engines):
        installed = _installed_voices(engine)
        missing = [v for v in ENGINE_VOICES[engine] if v not in installed]
        if missing:
            raise DataError(f"{engine} lacks the voice(s) {', '.join(missing)}; see ENGINE_VOICES for the packages")
        speakers += [Speaker(f"{engine}:{voice}") for voice in ENGINE_VOICES[engine]]
    return sorted(speakers)


def _installed_voices(engine: str) -> set[str]:
    """Voice names the engine lists: `flite -lv`, or festival's (voice.list)."""
    if engine == "flite":
        listing = _run("flite", "-lv")
    else:
        listing = _run("festival", "--pipe", stdin=b"(print (voice.list))")
    return set(re.findall(r"\w+", listing.decode()))


def split_speakers(
    voices: list[str], variants: list[str], seed: int, val_speakers: int, test_speakers: int
) -> dict[str, list[Speaker]]:
    """Val and test get k speakers each, pairing voices with variants no other split uses (a third of them,
    at least one, with English voices); train gets every pairing of the voices and variants left over."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    english = list(rng.permutation(sorted(v for v in set(voices) if v.startswith("en"))))
    accents = list(rng.permutation(sorted(set(voices) & ACCENT_VOICES)))
    timbres = list(rng.permutation(["", *sorted(set(variants) - EXCLUDED_VARIANTS)]))
    splits: dict[str, list[Speaker]] = {}
    for split, k in (("test", test_speakers), ("val", val_speakers)):
        n_english = max(1, round(k / 3))
        chosen = english[:n_english] + accents[: k - n_english]
        if len(chosen) < k or len(timbres) < k:
            raise DataError(f"espeak-ng has too few voices or variants left for {k} {split} speakers")
        english, accents = english[n_english:], accents[k - n_english :]
        splits[split] = [Speaker(str(v), str(w)) for v, w in zip(chosen, timbres[:k])]
        timbres = timbres[k:]
    if not english or not timbres:
        raise DataError("no English voice or variant is left for train; ask for fewer val/test speakers")
    splits["train"] = [Speaker(str(v), str(w)) for v in english + accents for w in timbres]
    return {split: sorted(splits[split]) for split in SPLITS}


def _speaker_weights(pool: list[Speaker]) -> np.ndarray:
    """Other engines' voices speak ENGINE_SHARE of a split's clips when it has any; of espeak-ng's clips, English
    voices speak ENGLISH_SHARE, however many accents the split has. Within each group every speaker is equal."""
    groups = np.array([0 if s.engine != "espeak-ng" else 1 if s.english else 2 for s in pool])
    espeak_share = 1 - ENGINE_SHARE if (groups == 0).any() else 1.0
    shares = (ENGINE_SHARE, espeak_share * ENGLISH_SHARE, espeak_share * (1 - ENGLISH_SHARE))
    weights = np.array([shares[g] / (groups == g).sum() for g in groups])
    return weights / weights.sum()


def split_counts(per_word: int) -> dict[str, int]:
    """Clips per word in each split: 10% val, 10% test (at least one each), the rest train."""
    held = max(1, round(per_word * HELDOUT_FRACTION))
    return {"train": per_word - 2 * held, "val": held, "test": held}


def plan(seed: int, per_word: int, speakers: dict[str, list[Speaker]]) -> list[Utterance]:
    """Every clip of the data set, each drawn from a Generator seeded by (seed, label, clip number)."""
    weights = {split: _speaker_weights(pool) for split, pool in speakers.items()}
    order = [split for split, n in split_counts(per_word).items() for _ in range(n)]
    utterances = []
    for label in bundled_labels("speechcommands"):
        for k, split in enumerate(order):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, label.index, k)))
            pool = speakers[split]
            utterances.append(
                Utterance(
                    split=split,
                    path=f"{split}/{label.display_name}/{k:04d}.wav",
                    mid=label.mid,
                    word=label.display_name,
                    speaker=pool[rng.choice(len(pool), p=weights[split])],
                    pitch=int(rng.integers(PITCH[0], PITCH[1], endpoint=True)),
                    speed=int(rng.integers(SPEED[0], SPEED[1], endpoint=True)),
                    amplitude=int(rng.integers(AMPLITUDE[0], AMPLITUDE[1], endpoint=True)),
                    noise=str(rng.choice(list(NOISE_SLOPES))),
                    snr_db=float(rng.uniform(*SNR_DB)),
                    position=float(rng.random()),
                    noise_seed=int(rng.integers(2**63)),
                )
            )
    return utterances


def trim_silence(wave: np.ndarray, frame: int = SAMPLE_RATE // 200) -> np.ndarray:
    """Drop leading and trailing 5 ms frames more than SILENCE_DB below the loudest frame."""
    n = len(wave) // frame
    energy = (wave[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)
    loud = np.flatnonzero(energy > energy.max(initial=0.0) * 10 ** (SILENCE_DB / 10))
    return wave[loud[0] * frame : (loud[-1] + 1) * frame] if loud.size else wave[:0]


def speak(word: str, speaker: Speaker, pitch: int, speed: int, amplitude: int) -> np.ndarray:
    """The word from the speaker's engine at 16 kHz, float32, silence trimmed. espeak-ng takes pitch, speed (words
    per minute) and amplitude (percent) itself; the other engines speak at their own pace and sox applies the
    three as tempo, pitch shift and gain, the same way for every voice (festival's HTS voice ignores
    Duration_Stretch)."""
    if speaker.engine == "espeak-ng":
        args = ("-v", speaker.name, "-p", str(pitch), "-s", str(speed), "-a", str(amplitude), "--stdout", word)
        return trim_silence(load_audio(_espeak(*args), SAMPLE_RATE))
    voice = speaker.voice.split(":", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        spoken, shifted = str(Path(tmp) / "spoken.wav"), str(Path(tmp) / "shifted.wav")  # sox needs a seekable file
        if speaker.engine == "flite":
            _run("flite", "-voice", voice, "-t", word, "-o", spoken)
        else:
            _run("text2wave", "-eval", f"(voice_{voice})", "-o", spoken, stdin=word.encode())
        tempo, cents = speed / WORDS_PER_MINUTE, (pitch - 50) * CENTS_PER_PITCH_STEP
        # -G: never clip; -D: no dither, so the same plan gives the same bytes
        _run("sox", "-G", "-D", spoken, shifted, "tempo", "-s", f"{tempo:.4f}", "pitch", str(cents))
        return trim_silence(load_audio(shifted, SAMPLE_RATE)) * np.float32(amplitude / 100)  # render() keeps the peak


def colored_noise(n: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-power Gaussian noise whose power spectrum falls as 1/f**slope (0 white, 1 pink, 2 brown)."""
    freqs = np.fft.rfftfreq(n)
    gain = np.zeros_like(freqs)
    gain[1:] = freqs[1:] ** (-slope / 2)
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return noise / np.sqrt(np.mean(noise**2))


def render(utt: Utterance) -> Clip:
    """Speak, fit into one second, place at the planned position and add noise at the planned SNR."""
    speed = utt.speed
    speech = speak(utt.word, utt.speaker, utt.pitch, speed, utt.amplitude)
    while len(speech) > CLIP_SAMPLES and speed < MAX_SPEED:
        # Too long for the window: say it faster, as a hurried speaker would, aiming at 95% of it.
        speed = min(MAX_SPEED, math.ceil(speed * len(speech) / (0.95 * CLIP_SAMPLES)))
        speech = speak(utt.word, utt.speaker, utt.pitch, speed, utt.amplitude)
    speech = speech[:CLIP_SAMPLES].astype(np.float64)
    if speech.size == 0:
        raise DataError(f"{utt.speaker.engine} gave silence for {utt.word!r} with voice {utt.speaker.name}")
    onset = int(utt.position * (CLIP_SAMPLES - len(speech)))
    noise = colored_noise(CLIP_SAMPLES, NOISE_SLOPES[utt.noise], np.random.default_rng(utt.noise_seed))
    wave = noise * math.sqrt(np.mean(speech**2) / 10 ** (utt.snr_db / 10))
    wave[onset : onset + len(speech)] += speech
    peak = np.abs(wave).max()
    if peak > PEAK:
        wave *= PEAK / peak
    return Clip(wave.astype(np.float32), onset, onset + len(speech))


def write_clip(path: Path, wave: np.ndarray) -> None:
    """16-bit PCM WAV, rounded explicitly so the bytes depend on nothing but the samples."""
    pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)
    sf.write(str(path), pcm, SAMPLE_RATE, subtype="PCM_16")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty; choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {out}: {exc.strerror}") from None


def generate(
    out: str | Path,
    per_word: int,
    seed: int,
    *,
    workers: int = 1,
    val_speakers: int = 6,
    test_speakers: int = 6,
    engines: tuple[str, ...] = ("espeak-ng",),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Write the data set to `out` (an empty or new folder); returns clips, speakers, voices and variants
    per split. `engines` must include espeak-ng (it speaks val and test); flite and festival add training
    voices. `progress(done, total)` is called after each clip."""
    if per_word < 3:
        raise DataError(f"per-word must be at least 3 (one clip for each split), got {per_word}")
    if min(val_speakers, test_speakers) < 1:
        raise DataError("val and test need at least one speaker each")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    if "espeak-ng" not in engines:
        raise DataError("engines must include espeak-ng: its voices speak the val and test splits")
    out = Path(out)
    speakers = split_speakers(espeak_voices(), espeak_variants(), seed, val_speakers, test_speakers)
    speakers["train"] = sorted(speakers["train"] + engine_speakers(engines))
    utterances = plan(seed, per_word, speakers)
    _prepare_out(out)
    for folder in sorted({(out / u.path).parent for u in utterances}):
        folder.mkdir(parents=True, exist_ok=True)

    def make(utt: Utterance) -> None:
        write_clip(out / utt.path, render(utt).wave)

    pool = ThreadPoolExecutor(workers)
    try:
        for done, _ in enumerate(pool.map(make, utterances), 1):
            if progress is not None:
                progress(done, len(utterances))
    finally:
        pool.shutdown(cancel_futures=True)

    with resources.as_file(resources.files("fastast") / "labels" / "speechcommands_class_labels_indices.csv") as src:
        shutil.copyfile(src, out / "labels.csv")
    splits, summary = {}, {}
    for split in SPLITS:
        mine = [u for u in utterances if u.split == split]
        write_manifest(out / f"{split}.json", [Example(out / u.path, (u.mid,)) for u in mine])
        used = Counter(u.speaker.name for u in mine)
        voices = sorted({s.voice for s in speakers[split]})
        variants = sorted({s.variant for s in speakers[split] if s.engine == "espeak-ng"})
        splits[split] = {"voices": voices, "variants": variants, "speakers": dict(sorted(used.items()))}
        summary[split] = {"clips": len(mine), "speakers": len(used), "voices": len(voices), "variants": len(variants)}
    clips = {u.path: u.speaker.name for u in utterances}
    record = {"seed": seed, "per_word": per_word, "engines": sorted(engines), "splits": splits, "clips": clips}
    (out / "speakers.json").write_text(json.dumps(record, indent=1) + "\n")
    return summary
