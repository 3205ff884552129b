"""The errors a user can cause or fix. `cli.py` turns each into `Error: ...` and exit code 1."""


class SfrError(Exception):
    """Base of every error sfr reports to the user without a traceback."""


class ConfigError(SfrError):
    """A YAML config that is missing, malformed, or describes an impossible model."""


class CheckpointError(SfrError):
    """A checkpoint folder or file that is missing, unsafe, truncated, or does not fit the config."""


class CoefficientsError(SfrError):
    """A coefficient file that cannot be read, or whose values or shape SadTalker cannot use."""


class MediaError(SfrError):
    """A source image, audio file, output location or ffmpeg run that failed."""


class RenderError(SfrError):
    """A render that cannot go on: no memory left even at batch size 1, an unsupported precision, ..."""


class DownloadError(SfrError):
    """A weights download that failed: no network, a server error, a stalled or cut-off transfer."""


class SadTalkerError(SfrError):
    """A SadTalker checkout that is not there, or whose code (its preprocessing steps) fails to import."""
