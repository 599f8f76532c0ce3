# GPU worker image for progprune: the same image runs the Ray head, the GPU workers and the
# RayJob submitter (manifests/). Build (see docs/deploy.md):
#   docker build --build-arg CUDA_TAG=cu128 -t REGISTRY/progprune:0.1.0 .
# RAY_VERSION must equal the ray pin in pyproject.toml and rayVersion in manifests/base;
# tests/test_dockerfile.py and tests/test_manifests.py check both.
ARG RAY_VERSION=2.60.0
# CUDA_TAG picks both the base image and the torch wheel index, so the two cannot drift;
# use "cpu" for a CPU-only image (rayproject/ray:...-py311-cpu + the cpu wheel index).
ARG CUDA_TAG=cu128
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}

# ARGs declared before FROM are not visible after it unless re-declared.
ARG CUDA_TAG
ARG TORCH_VERSION=2.13.0
# torchvision for tv:NAME models (ray_jobs/imagenet_resnet50.yaml): the release built against
# TORCH_VERSION, from the same wheel index; empty leaves it out.
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${CUDA_TAG}

LABEL org.opencontainers.image.title="progprune" \
      org.opencontainers.image.description="FLOPs-targeted progressive structured pruning sweeps on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image's user: ray (uid 1000, gid 100 "users"), HOME=/home/ray, and it owns the
# conda env under /home/ray/anaconda3, so pip needs no root. Numeric so that the kubelet can
# verify runAsNonRoot.
USER 1000:100
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Made by the ray user first: the classic builder's WORKDIR would create it owned by root,
# and `pip install .` below writes progprune.egg-info into it.
RUN mkdir -p /home/ray/progprune
WORKDIR /home/ray/progprune

# Layer 1, torch (~GBs) and torchvision: depend only on the build args, so code and
# dependency edits reuse them.
# The base image has no torch; the CUDA build must match the image's CUDA (same CUDA_TAG).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
        ${TORCHVISION_VERSION:+"torchvision==${TORCHVISION_VERSION}"}

# Layer 2, the project's dependencies, read from pyproject.toml and held to the versions of
# the lock docker/constraints.txt (generated from pyproject.toml by docker/lock.py), so two
# builds a month apart install the same versions. A change under progprune/ does not
# invalidate it. torch is already satisfied by layer 1; ray is the base image's (same
# version, pinned in pyproject.toml).
COPY --chown=1000:100 pyproject.toml docker/constraints.txt ./
# The `export` extra too (onnx, onnxruntime): `progprune export`, `export: [onnx]` and
# evaluation.runtime: onnxruntime on the cluster (CPU provider); and `llm` (transformers,
# tokenizers): task causal_lm (docker/lock.py's IMAGE_EXTRAS).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['export'] + p['optional-dependencies']['llm']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c constraints.txt \
    && rm /tmp/requirements.txt

# Layer 3, the code (.dockerignore lets in only the package, pyproject, its README, the lock
# and the shipped specs: no data, checkpoints, results, credentials or .git).
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 progprune/ progprune/
COPY --chown=1000:100 ray_jobs/ ray_jobs/
RUN pip install --no-cache-dir --no-deps . \
    && progprune --help > /dev/null

# No ENTRYPOINT: KubeRay sets the command of every Ray container (ray start ...) and of the
# submitter (ray job submit ...).
CMD ["progprune", "--help"]
