# wd-sok on NVIDIA GPUs.
#
# Base: NVIDIA's Merlin TensorFlow container 23.08, which ships, built for CUDA, what wd-sok's GPU path needs:
# TensorFlow 2.12.0 (NGC build, Keras 2.12), Python 3.10, CUDA 12.1, Horovod with NCCL, NVTabular, cuDF and
# merlin-dataloader 23.08 (GPU preprocessing and loading). Its Sparse Operation Kit is the legacy 1.2.0, whose
# top level lacks the 2.x API wd-sok calls (sok.init / Variable / lookup_sparse / filter_variables), so
# scripts/install_sok.sh replaces it with SOK 2.1.0 built from HugeCTR tag v25.03.00 (not PyPI's merlin-sok
# 2.1.0 = HugeCTR 24.06: the same version string, without the find-only lookup wd-sok's dynamic tables need;
# README, "What SOK features are used"), compiled here against the container's TensorFlow, CUDA and Horovod,
# as the container built its own SOK. Nothing else NVIDIA built is replaced. The versions are in the labels
# below and in the README's GPU quick start (tests/test_dockerfile.py checks they agree);
# scripts/check_tf_compat.sh runs the tests with this TensorFlow version.
#
#   docker build -t wd-sok:gpu .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 -e GPU=8 -v /data:/data wd-sok:gpu \
#       --dataset_path /data/outbrain --model_dir /data/runs/ckpt --results_dir /data/runs/results
#
# The entrypoint runs `horovodrun -np ${GPU} python main.py <arguments>`: one process per GPU, embeddings
# sharded over them (SOK), the MLP data-parallel. `--entrypoint bash` gives a shell instead.
FROM nvcr.io/nvidia/merlin/merlin-tensorflow:23.08

LABEL org.opencontainers.image.title="wd-sok" \
      org.opencontainers.image.description="Wide & Deep CTR trainer with model-parallel embeddings (SOK on GPU)" \
      wd-sok.tensorflow="2.12.0" \
      wd-sok.python="3.10" \
      wd-sok.cuda="12.1" \
      wd-sok.sok="2.1.0" \
      wd-sok.hugectr="v25.03.00"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    SOK_COMPILE_GPU_SM="70;75;80;90" \
    GPU=1
WORKDIR /workspace/wd-sok

# SOK 2.x in place of the container's legacy SOK 1.2 (compiles CUDA kernels: the slow step of the build), then
# the extras wd-sok imports that are not part of the Merlin stack (the spec parser and the learning-curve plot).
COPY scripts/install_sok.sh ./scripts/install_sok.sh
RUN bash scripts/install_sok.sh 2.1.0 v25.03.00 \
 && python -m pip install --no-cache-dir "pyyaml==6.0.1" "matplotlib==3.8.4"

# The package itself; --no-deps: TensorFlow, Horovod and Merlin stay the container's own builds.
COPY pyproject.toml README.md main.py ./
COPY wd_sok ./wd_sok
RUN python -m pip install --no-cache-dir --no-deps -e . \
 && python main.py --help > /dev/null

# Feature specs, preprocessing and benchmark scripts, and the test suite (`python -m pytest tests`).
COPY data ./data
COPY scripts ./scripts
COPY benchmarks ./benchmarks
COPY tests ./tests

ENTRYPOINT ["/bin/bash", "-c", "exec horovodrun -np \"${GPU}\" python main.py \"$@\"", "wd-sok"]
CMD ["--help"]
