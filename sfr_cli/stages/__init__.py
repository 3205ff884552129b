"""Frame stages: what happens to the engine's frames on the render device before they cross to the host.

A stage is one small object:
- `name`: a short word for notes and timings (`aspect`, `paste`, ...);
- `output_size(width_px, height_px) -> (width_px, height_px)`: its frames' size given its input's;
- `load(device, models)`: bind to the render device and load its weights, if any, through the model
  cache `models` (`models.stage_model(key, build)`: built once per process and key, shared by the clips
  of a batch); called once a job's engine is known, before its first frame;
- `report()` (optional): what the stage tells a job's report (`--json`), e.g. the enhancer's faces;
- `__call__(frames) -> frames`: a batch `(B, H, W, 3) uint8` on the render device -> `(B, H', W', 3) uint8`
  on the same device (a batch may hold any number of frames of one clip).

A stage module (one per kind, listed in `STAGE_MODULES` in chain order) has `plan(job, size_px, note)`:
it checks the job's options and files for that stage, before any model loads (reading pictures, finding
a crop box, finding weight files), and returns the job's stages of that kind (often none). Adding a stage
is one module and one line here. `streaming` runs the chain: on CUDA on a stream of its own, so it does
not serialise with the engine, and the frames cross to the host once, after the last stage.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# chain order: paste-back (aspect resize, blend) first, then the face enhancer on the pasted picture
STAGE_MODULES: Tuple[str, ...] = ("paste", "enhance")


def stage_modules() -> List:
    """The stage modules, in chain order (imported here, lazily: none imports torch at import time)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in STAGE_MODULES]


def plan_stages(job, size_px: int, note: Callable[[str], None], kinds: Optional[Sequence[str]] = None) -> List:
    """Every stage `job` asks for, in chain order, each checked (see the module docstring); `kinds` limits
    the stage modules asked (`sfr enhance` asks the enhancer only)."""
    stages: List = []
    for name, module in zip(STAGE_MODULES, stage_modules()):
        if kinds is None or name in kinds:
            stages.extend(module.plan(job, size_px, note))
    return stages


def stage_input_files(job) -> List[Tuple["Path", str]]:
    """(path, stage name) of every file the stages `job` asks for read (each module's `input_files(job)`):
    inputs no output of the job may be."""
    return [(path, name) for name, module in zip(STAGE_MODULES, stage_modules())
            for path in getattr(module, "input_files", lambda job: [])(job)]


def chain_output_size(stages: Sequence, width_px: int, height_px: int) -> Tuple[int, int]:
    """(width, height) of the frames that leave the chain, given the engine's."""
    for stage in stages:
        width_px, height_px = stage.output_size(width_px, height_px)
    return width_px, height_px


def stage_reports(stages: Sequence) -> Dict[str, object]:
    """What the stages that report something (`report()`) tell a job's report, merged in chain order."""
    merged: Dict[str, object] = {}
    for stage in stages:
        if hasattr(stage, "report"):
            merged.update(stage.report())
    return merged
