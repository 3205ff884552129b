"""sfr, the Smart Face Renderer: SadTalker's face-render stage as a batch command-line tool."""

__version__ = "0.1.0"
