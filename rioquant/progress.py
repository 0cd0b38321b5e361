"""Progress bars for long work, on a terminal only.

One rule for every command: a bar is drawn when the user asked for progress (no `--no-progress`) and
standard error is a terminal. In a log file, a CI job or a pipe a bar is noise (hundreds of carriage-
return frames), so there it stays quiet; the result lines and warnings still go out as usual.
"""

import sys

from tqdm import tqdm


def progress_bar(enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on standard error, disabled unless `enabled` and standard error is a terminal."""
    return tqdm(file=sys.stderr, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True,
                mininterval=1.0, **kwargs)
