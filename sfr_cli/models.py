"""Models in one home: what a process loads once and keeps between jobs.

`ModelCache` holds the engines (keyed by what they were loaded from: config, checkpoint files, device,
precision, batch size), the frame stages' weights (`stage_model`, keyed by the stage), the source work
of recent faces (keypoints, feature volume) and the resized source images the checks read. Loading runs
one way: a checked job asks the cache (`engine`, `source_state`, `load_group`), the cache builds what it
lacks (`build_engine`: the networks read by `checkpoints`, an `engine.Engine` around them).
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from . import media

SOURCE_CACHE_ENTRIES = 8  # source states kept (a 256 px source state is a few MiB)


def build_engine(prepared):
    """Load the networks a checked job names and build its engine (what `ModelCache.engine` keeps)."""
    from . import checkpoints
    from .engine import Engine, EngineOptions, configure_torch, resolve_device

    job = prepared.job
    configure_torch(resolve_device(job.device))
    nets = checkpoints.load_networks(prepared.config, prepared.files)
    return Engine(nets, EngineOptions(device=job.device, precision=job.precision, batch_size=job.batch_size,
                                      compile_scope="decoder" if prepared.compile_decoder else "none"))


def load_group(group: Sequence, models):
    """The engine and source state a group shares, and every job's stages loaded on its device."""
    engine = models.engine(group[0])
    state = models.source_state(engine, group[0])
    for prepared in group:
        for stage in prepared.stages:
            stage.load(engine.device, models)
    return engine, state


SOURCE_IMAGES_KEPT = 8  # resized source images kept per cache (a 256 px one is 0.75 MiB)


class SourceImages:
    """A small LRU of resized source images keyed by (path, size, modification time, size_px), thread-safe.
    A batch checks each row, then renders it, often with one face for many clips: the Renderer's model
    cache holds one (`ModelCache.source_images`), with its source states."""

    def __init__(self, entries: int = SOURCE_IMAGES_KEPT):
        self._images: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
        self._entries = max(0, entries)
        self._lock = threading.Lock()

    def read(self, path, size_px: int) -> np.ndarray:
        """`media.read_source_image(path, size_px)`, from the cache when the file is unchanged (a copy)."""
        try:
            info = os.stat(path)
            key = (os.path.abspath(path), info.st_size, info.st_mtime_ns, size_px)
        except OSError:
            key = None  # read_source_image says what is wrong
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key].copy()
        image = media.read_source_image(path, size_px)
        if key is not None and self._entries:
            with self._lock:
                self._images[key] = image.copy()
                while len(self._images) > self._entries:
                    self._images.popitem(last=False)
        return image


class ModelCache:
    """What a process keeps between jobs: engines keyed by what they were loaded from, frame stages'
    weights keyed by their stage (`stage_model`), source images (`source_images`: the faces of planned jobs,
    read again at render) and
    source work keyed by what it was computed from; the one source cache. Thread-safe for lookups.

    Passed to `streaming.render_prepared` as its `models`."""

    def __init__(self, source_entries: int = SOURCE_CACHE_ENTRIES):
        self._engines: Dict[Tuple, object] = {}
        self._stage_models: Dict[Tuple, object] = {}
        self._sources: "collections.OrderedDict[Tuple, object]" = collections.OrderedDict()
        self._source_entries = max(0, source_entries)
        self._lock = threading.RLock()
        self.source_images = SourceImages()
        self.loads = 0  # models loaded so far (for tests and the benchmark)
        self.source_hits = 0
        self.source_seconds = 0.0  # spent on source work (a render cost, kept apart by the benchmark)

    @property
    def engines(self) -> List:
        """The engines loaded so far (their `stats` show the batches of the last clip or packed group)."""
        return list(self._engines.values())

    @staticmethod
    def _engine_key(prepared) -> Tuple:
        job, files = prepared.job, prepared.files
        return (str(prepared.config.path), str(files.renderer), str(files.mapping), job.device, job.precision,
                job.batch_size, job.compile)

    def engine(self, prepared):
        key = self._engine_key(prepared)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = build_engine(prepared)
                self.loads += 1
        engine.stats.batch_sizes.clear()  # per clip (or packed group): the report gives its batches
        return engine

    def stage_model(self, key: Tuple, build: Callable[[], object]):
        """A frame stage's weights (or any model it needs) for `key` (what they were loaded from and where
        they run): `build()` once per process and key, shared by every clip after."""
        with self._lock:
            model = self._stage_models.get(key)
            if model is None:
                model = self._stage_models[key] = build()
                self.loads += 1
            return model

    def source_image(self, prepared):
        """A planned job's source face, read again through `source_images` when its plan dropped it."""
        return prepared.source_image(self.source_images)

    def _source_key(self, prepared) -> str:
        """What a source state is computed from: the face image's pixels and the source window."""
        window = np.ascontiguousarray(prepared.semantics.source_window(), dtype=np.float32)
        digest = hashlib.blake2b(np.ascontiguousarray(self.source_image(prepared)).tobytes(), digest_size=16)
        digest.update(window.tobytes())
        return digest.hexdigest()

    def pack_key(self, prepared) -> Tuple:
        """Jobs with equal keys share one engine and one source state, so they can render as one packed
        stream (`streaming.render_prepared_group`). Loads nothing."""
        return self._engine_key(prepared), self._source_key(prepared)

    def source_state(self, engine, prepared):
        window = np.ascontiguousarray(prepared.semantics.source_window(), dtype=np.float32)
        key = (id(engine), self._source_key(prepared))
        with self._lock:
            state = self._sources.get(key)
            if state is not None:
                self._sources.move_to_end(key)
                self.source_hits += 1
                return state
        started = time.perf_counter()
        state = engine.prepare_source(self.source_image(prepared), window)
        self.source_seconds += time.perf_counter() - started
        if self._source_entries:
            with self._lock:
                self._sources[key] = state
                while len(self._sources) > self._source_entries:
                    self._sources.popitem(last=False)
        return state
