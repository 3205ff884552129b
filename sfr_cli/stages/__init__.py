"""Frame stages: what happens to the frames on the render device before they cross to the host.

A stage module (one per kind, listed in `STAGE_MODULES` in chain order) owns everything about its stage:
- `OPTIONS`: its rows of the one option table (`options.OptionRow`): the Click options, the manifest
  columns, the `Renderer` keywords and the README rows come from them;
- `Options`: a frozen dataclass, one field per row (same name, the row's default), what a job carries
  for the stage: `job.stages["<module name>"]`;
- `input_files(options, job) -> [(path, role)]`: every file the stage reads (a picture, its weights as
  found), for the checks that no output is an input;
- `plan(options, job, size_px, note) -> [stage, ...]`: checks the options and files before any model
  loads (reading pictures, finding a crop box, finding and checking weight files; a missing file is a
  clean error here) and returns the job's stage objects of this kind (often none); `job` gives the
  job-wide settings (`checkpoint_dir`, `precision`, `source`, `preprocess` for a render);
- its weights' own rules (find, check, load, random ones), beside the stage.

A stage object:
- `name`: a short word for notes and timings (`aspect`, `paste`, ...);
- `output_size(width_px, height_px) -> (width_px, height_px)`: its frames' size given its input's;
- `load(device, models)`: bind to the render device and load its weights, if any, through the model
  cache `models` (`models.stage_model(key, build)`: built once per process and key, shared by the clips
  of a batch); called once a job's frame source is known, before its first frame;
- `report()` (optional): what the stage tells a job's report (`--json`), e.g. the enhancer's faces;
- `describe()` (optional, once loaded): a few words on how it batches, for the job's notes;
- `__call__(frames) -> frames`: a batch `(B, H, W, 3) uint8` on the render device -> `(B, H', W', 3) uint8`
  on the same device (a batch may hold any number of frames of one clip).

Adding a stage is one module and one line in `STAGE_MODULES`. A stage any of whose rows `sfr enhance`
declares (`commands` holding ENHANCE) also runs on frames that already exist (`sfr enhance`).
`streaming` runs the chain: on CUDA on a stream of its own, so it does not serialise with the engine,
and the frames cross to the host once, after the last stage.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Sequence, Tuple

# chain order: paste-back (aspect resize, blend) first, then the face enhancer on the pasted picture
STAGE_MODULES: Tuple[str, ...] = ("paste", "enhance")
ENHANCE_COMMAND = "enhance"  # options.ENHANCE (not imported: options imports this package)


def stage_modules() -> List:
    """The stage modules, in chain order (imported here, lazily: none imports torch at import time).
    A name with a dot is a full module name (a stage kept outside this package)."""
    return [importlib.import_module(name if "." in name else f"{__name__}.{name}") for name in STAGE_MODULES]


def stage_names() -> List[str]:
    """The key of each stage module in `job.stages`: its last name (`paste`, `enhance`, ...)."""
    return [name.rpartition(".")[2] for name in STAGE_MODULES]


def default_options(frames_in: bool = False) -> Dict[str, object]:
    """`{stage name: its Options()}`, in chain order: what a render job carries when no stage option is
    given; with `frames_in`, only the stages that also run on existing frames (`sfr enhance`)."""
    return {name: module.Options() for name, module in zip(stage_names(), stage_modules())
            if not frames_in or any(ENHANCE_COMMAND in row.commands for row in module.OPTIONS)}


def option_owners() -> Dict[str, str]:
    """`{option name: the stage that owns it}` for every stage row."""
    return {row.name: name for name, module in zip(stage_names(), stage_modules()) for row in module.OPTIONS}


def _planned_modules(job) -> List[Tuple[str, object]]:
    return [(name, module) for name, module in zip(stage_names(), stage_modules()) if name in job.stages]


def plan_stages(job, size_px: int, note: Callable[[str], None]) -> List:
    """Every stage `job` asks for (`job.stages`), in chain order, each checked (see the module docstring)."""
    stages: List = []
    for name, module in _planned_modules(job):
        stages.extend(module.plan(job.stages[name], job, size_px, note))
    return stages


def stage_input_files(job) -> List[Tuple[object, str]]:
    """`(path, role)` of every file the stages of `job` read (`input_files` of each): inputs no output of
    the job may be."""
    return [item for name, module in _planned_modules(job) for item in module.input_files(job.stages[name], job)]


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
