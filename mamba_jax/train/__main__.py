"""`python -m mamba_jax.train --config experiments/<recipe>.py[:variant] [--config.<key>=<value> …] --workdir DIR`

Rerunning the same command resumes from the newest checkpoint in DIR. Configs are ml-collections files,
locked, so a misspelt override fails with the nearest valid key.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. experiments/mamba2_130m.py[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")


def _parse(argv):
    """absl's flag parsing, with config errors reported as one clear line instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            raise ValueError("--config is required, e.g. --config experiments/quickstart.py")
        if not _WORKDIR.value:
            raise ValueError("--workdir is required: the directory for checkpoints, metrics and the config.")
        return rest
    except (flags.Error, ValueError, AttributeError, KeyError, TypeError, FileNotFoundError) as e:
        cause = e.__cause__ or e
        print(f"mamba_jax.train: error: {str(cause).strip(chr(39))}", file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    del argv
    # Library INFO chatter (orbax, jax backends) hides the training log; warnings still show.
    logging.set_verbosity(logging.WARNING)
    from mamba_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    from mamba_jax.train.loop import TrainingAborted, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except TrainingAborted as e:
        print(f"mamba_jax.train: aborted: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
