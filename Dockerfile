# wd-sok on NVIDIA GPUs.
#
# Base: NVIDIA's Merlin TensorFlow container, which already ships, built for CUDA, everything wd-sok's GPU path
# needs: TensorFlow 2, Sparse Operation Kit (the `sok` embedding backend), Horovod with NCCL, NVTabular (the
# Outbrain preprocessing) and merlin-dataloader. This image only adds wd-sok itself and two small pure-Python
# packages the container may lack; nothing NVIDIA built is replaced.
#
#   docker build -t wd-sok:gpu .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 -e GPU=8 -v /data:/data wd-sok:gpu \
#       --dataset_path /data/outbrain --model_dir /data/runs/ckpt --results_dir /data/runs/results
#
# The entrypoint runs `horovodrun -np ${GPU} python main.py <arguments>`: one process per GPU, embeddings
# sharded over them (SOK), the MLP data-parallel. `--entrypoint bash` gives a shell instead.
# See docs/gpu_quickstart.md.
FROM nvcr.io/nvidia/merlin/merlin-tensorflow:23.08

LABEL org.opencontainers.image.title="wd-sok" \
      org.opencontainers.image.description="Wide & Deep CTR trainer with model-parallel embeddings (SOK on GPU)"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    GPU=1
WORKDIR /workspace/wd-sok

# Extras wd-sok imports that are not part of the Merlin stack (the spec parser and the learning-curve plot).
RUN python -m pip install --no-cache-dir "pyyaml==6.0.1" "matplotlib==3.8.4"

# The package itself; --no-deps: TensorFlow, Horovod, SOK and Merlin stay the container's own builds.
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
