"""`python -m mamba_jax.train`: not available yet in this version (the training loop is being built)."""

import sys


def main() -> int:
    print(
        "mamba_jax.train: coming soon. The training loop, data pipeline and checkpoints are the next piece of work;\n"
        "this version has the model library (mamba_jax.ssd, the layers, every recipe in experiments/) and its tests."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
