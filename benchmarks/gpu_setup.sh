# Source this on the GPU machine (the device tool's copy of the repository) before a benchmark:
# installs the carried wheels the image lacks (grain, ml-collections; see ../shared/tools/device-wheels),
# puts the repository on the path with kernels/ visible as mamba_jax.kernels, and prints the machine.
S=$(mktemp -d)
# Not pytest and its helpers where the image has them: an older pytest there breaks the image's pytest plugins.
W=$(ls .whl/*.whl | grep -v -E '/(pytest|pluggy|iniconfig)-' || true)
python3 -c "import pytest" 2>/dev/null || W=$(ls .whl/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S" $W || return 1
export PYTHONPATH="$S:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
[ -e mamba_jax/kernels ] || ln -s ../kernels mamba_jax/kernels
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
