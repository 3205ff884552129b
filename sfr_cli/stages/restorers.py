"""The face enhancer's restorers: the net that turns an aligned 512 face into a restored one, one entry each.

The face path around a restorer (detection, alignment, the ParseNet mask, the paste on the background)
is the same for every restorer and lives in `stages.enhance`; an entry here says only what differs:

- `name`: the `--enhancer` value (`<name>-tiny` is the same net at test widths, for fast tests);
- `weights_file`: its file, found where the face path's files are (SadTalker's `gfpgan/weights`);
- `wrappers`: the keys its state dict may sit under in the file, tried in order (None: a flat state dict);
- `build(tiny)`: the untrained net, no I/O (eval mode is set by the caller);
- `restore(net, faces, noise)`: `(N, 3, 512, 512) uint8 RGB` -> the same shape, restored;
- `draw_noise(net, seed, device)`: one face's fresh noise for `--enhancer-noise random`, or None when the
  restorer draws no noise (the option then does not apply);
- `random_state_dict(net, seed)` and `wrap`: random weights in the real file's layout (`sfr checkpoints
  random --enhancer`).

Adding a restorer is its net in `nets/` and one entry in `RESTORERS`; every list of
enhancer names (the CLI's choices, the weights lookup, the random-weights writer) is read from here.
Importing this module imports no torch: the entries import their nets when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

TINY_SUFFIX = "-tiny"


@dataclass(frozen=True)
class Restorer:
    name: str
    weights_file: str
    wrappers: Optional[Tuple[str, ...]]
    build: Callable[[bool], object]
    restore: Callable[[object, object, Optional[list]], object]
    random_state_dict: Callable[[object, int], Dict]
    draw_noise: Optional[Callable[[object, int, object], list]] = None
    about: str = ""  # the net's family, for messages: "GFPGAN"

    def wrap(self, state_dict: Dict) -> Dict:
        """The file's layout: under the first wrapper key (`{'params_ema': sd}`), or flat."""
        return {self.wrappers[0]: state_dict} if self.wrappers else state_dict

    def unwrap(self, checkpoint: Dict) -> Dict:
        """The state dict inside the file (its first wrapper key present); KeyError naming what was found."""
        return unwrap_state_dict(checkpoint, self.wrappers, self.about)


def unwrap_state_dict(checkpoint: Dict, wrappers: Optional[Tuple[str, ...]], about: str) -> Dict:
    """The state dict inside a weights file: under the first of `wrappers` present (all of it when None);
    KeyError naming what was found. `about` names the net for the message."""
    if not wrappers:
        return dict(checkpoint)
    for wrapper in wrappers:
        if wrapper in checkpoint:
            return dict(checkpoint[wrapper])
    found = ", ".join(sorted(map(str, checkpoint))[:5])
    raise KeyError(f"a {about} checkpoint holds its weights under "
                   f"{' or '.join(repr(w) for w in wrappers)}; found: {found}")


def _build_gfpgan(tiny: bool):
    from ..nets.gfpgan import GFPGANER_CLEAN_CONFIG, TINY_GFPGAN_CONFIG, GFPGANv1Clean

    return GFPGANv1Clean(**(TINY_GFPGAN_CONFIG if tiny else GFPGANER_CLEAN_CONFIG))


def _restore_gfpgan(net, faces, noise):
    from ..nets.gfpgan import restore_faces

    return restore_faces(net, faces, noise=noise)


def _gfpgan_noise(net, seed: int, device):
    from ..nets.stylegan2 import draw_noise

    return draw_noise(net.stylegan_decoder, seed, 1, device)


def _gfpgan_random(net, seed: int):
    from ..nets.gfpgan import random_state_dict

    return random_state_dict(net, seed)


def _build_restoreformer(tiny: bool):
    from ..nets.restoreformer import RESTOREFORMER_CONFIG, TINY_RESTOREFORMER_CONFIG, RestoreFormer

    return RestoreFormer(**(TINY_RESTOREFORMER_CONFIG if tiny else RESTOREFORMER_CONFIG))


def _restore_restoreformer(net, faces, noise):
    from ..nets.restoreformer import restore_faces

    return restore_faces(net, faces)  # draws no noise (`draw_noise` None: noise is never passed)


def _restoreformer_random(net, seed: int):
    from ..nets.restoreformer import random_state_dict

    return random_state_dict(net, seed)


RESTORERS: Dict[str, Restorer] = {
    "gfpgan": Restorer("gfpgan", "GFPGANv1.4.pth", ("params_ema", "params"), _build_gfpgan, _restore_gfpgan,
                       _gfpgan_random, _gfpgan_noise, about="GFPGAN"),
    # GFPGANer(arch='RestoreFormer'): the same face path, gfpgan 1.3.8's RestoreFormer() as the restorer
    "restoreformer": Restorer("restoreformer", "RestoreFormer.pth", ("params_ema", "params"), _build_restoreformer,
                              _restore_restoreformer, _restoreformer_random, about="RestoreFormer"),
}

# The one list of enhancer names (`--enhancer`'s choices, the weights code, the random-weights writer).
ENHANCERS: Tuple[str, ...] = tuple(name for restorer in RESTORERS
                                   for name in (restorer, restorer + TINY_SUFFIX))


# Other spellings of a name (SadTalker's `--enhancer RestoreFormer`): accepted wherever a name is given.
ALIASES: Dict[str, str] = {"RestoreFormer": "restoreformer"}


def canonical(enhancer: str) -> str:
    """`enhancer` as `ENHANCERS` spells it (an alias, `RestoreFormer`, becomes `restoreformer`)."""
    return ALIASES.get(enhancer, enhancer)


def restorer_of(enhancer: str) -> Tuple[Restorer, bool]:
    """(its restorer, tiny) for an `--enhancer` name; KeyError for an unknown one."""
    enhancer = canonical(enhancer)
    tiny = enhancer.endswith(TINY_SUFFIX)
    return RESTORERS[enhancer[: -len(TINY_SUFFIX)] if tiny else enhancer], tiny
