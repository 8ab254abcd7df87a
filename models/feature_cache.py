"""A process-wide cache of audio features, shared by every engine in the process.

vLLM caches processed multimodal items per engine. A duplex session's prompt re-sends the user's last
turns (history), and the two engines take turns answering, so the history audio of a turn answered
by the other engine misses that engine's cache and its fbank is computed again on the event loop's
thread (the kaldi binding holds the GIL). Keyed by a digest of the samples and the extractor's
settings, this cache computes each segment's features once for both engines.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from .audio_features import AudioFeatureExtractor

DEFAULT_MAX_BYTES = 64 << 20  # ~900 features of 1 s clips' size class; a few turns of hundreds of sessions


class FeatureCache:
    """LRU of (extractor settings, samples) -> fbank features, bounded in bytes. Thread-safe: vLLM
    runs input processing in worker threads."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def features(self, extractor: AudioFeatureExtractor, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if extractor.dither:  # dithered features are random by design: never replay them
            return extractor(samples)
        key = _fingerprint(extractor) + hashlib.blake2b(samples.data, digest_size=16).digest()
        with self._lock:
            feats = self._items.get(key)
            if feats is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return feats
        feats = extractor(samples)  # outside the lock: two threads may compute the same clip once each
        feats.setflags(write=False)  # shared between requests: nobody may change it in place
        with self._lock:
            self.misses += 1
            if key not in self._items and feats.nbytes <= self.max_bytes:
                self._items[key] = feats
                self._bytes += feats.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return feats

    def __len__(self) -> int:
        return len(self._items)


def _fingerprint(extractor: AudioFeatureExtractor) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((extractor.num_mel_bins, extractor.frame_length_ms, extractor.frame_shift_ms,
                        extractor.dither)).encode())
    digest.update(np.ascontiguousarray(extractor.cmvn_means, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(extractor.cmvn_istds, dtype=np.float32).tobytes())
    return digest.digest()


shared = FeatureCache()
