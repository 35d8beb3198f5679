#!/usr/bin/env bash
# The GPU check: one call on a machine with a CUDA GPU, from the repository root.
#
#   1. the CUDA tests (CUDA and CPU results agree: the compiled engine, the column chain, the
#      DeepProbLog engine's tables on the GPU), which are skipped on a CPU-only machine;
#   2. queries per second of the whole joint step (full objective) on CUDA against the CPU,
#      measured side by side in one process, for N = 1, 2, 4 and 15 digits
#      (benchmarks/joint_speed.py; random images, no MNIST files needed);
#   3. KLay against our compiled engine on CUDA (benchmarks/klay_speed.py --device cuda), when the
#      klaycircuits wheel is installed (PyPI has it for CPython 3.11 only: add
#      klaycircuits==0.1.2 to the download below on a 3.11 machine); otherwise one line says so.
#
# Where deepproblog, problog and pysdd are not installed (a bare device image), put their wheels
# for that machine's Python in .whl/ first, e.g. for CPython 3.12 on x86-64:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl deepproblog==2.1.0 problog==2.3.0 pysdd==1.0.6
#
# (torch, torchvision, numpy, scipy, scikit-learn, pyyaml, tqdm and matplotlib are expected
# there). The output ends with a markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gedi_site .whl/*.whl
    export PYTHONPATH="/tmp/gedi_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -p no:cacheprovider -q -rs -m "" -k "cuda or gpu" tests/
python3 benchmarks/joint_speed.py --devices cpu cuda --digits 1 2 4 --steps 5 --warmup 2 \
    --cache-dir /tmp/gedi_circuits
python3 benchmarks/joint_speed.py --devices cpu cuda --digits 15 --steps 2 --warmup 1 \
    --cache-dir /tmp/gedi_circuits
if python3 -c "import klay" 2> /dev/null; then
    python3 benchmarks/klay_speed.py --device cuda --repeats 7 --cache-dir /tmp/gedi_circuits
else
    echo "klay_speed.py skipped: KLay is not installed (pip install klaycircuits, CPython 3.11)"
fi
