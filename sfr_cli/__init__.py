"""sfr, the Smart Face Renderer: SadTalker's face-render stage as a batch command-line tool.

`from sfr_cli import Renderer` is the Python API (see `sfr_cli.renderer`); it is imported on first use,
so `sfr --help` never imports torch.
"""

__version__ = "0.1.0"
__all__ = ["Renderer", "__version__"]


def __getattr__(name):
    if name == "Renderer":
        from .renderer import Renderer

        return Renderer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
