# vita-duplex on GPUs: the official vLLM image of the version we pin (vllm==0.32.0 in the `gpu` extra)
# plus this project. CUDA, PyTorch and vLLM come from the image and are never replaced.
#
#   docker build -t vita-duplex .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro -e VITA_API_KEYS=... vita-duplex
#
# Build argument EXTRAS: the pip extras to install; default `gpu`. `--build-arg EXTRAS=gpu,espeak` adds the
# embedded speech voice (espeak-ng, GPL-3), which makes the image a GPL-3 distribution; without it the
# server answers in text, or speaks through an OpenAI-compatible TTS server (VITA_TTS=http).
FROM vllm/vllm-openai:v0.32.0

ARG EXTRAS=gpu

WORKDIR /opt/vita-duplex
COPY . .

# Install against constraints that pin every package the image already has (`pip list --format=freeze`
# prints plain name==version lines, also for packages installed from wheels/URLs). pip can then only ADD
# packages: torch, vllm, transformers, ... stay exactly as the image ships them, and a dependency that
# would need a different version makes the build fail here instead of silently swapping the CUDA stack.
# PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the application's environment (as in vLLM's own build);
# it has no effect where that interpreter carries no EXTERNALLY-MANAGED marker.
# Then: the installed package (not this source tree: -I leaves the working directory off sys.path) imports,
# the CLI loads all its subpackages, and the smoke check is installed (operators run `vita-duplex smoke`).
RUN python3 -m pip list --format=freeze > /tmp/image-packages.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
        --constraint /tmp/image-packages.txt ".[${EXTRAS}]" \
    && rm /tmp/image-packages.txt \
    && python3 -I -c "import importlib.metadata as m; import models.plugin; print('vllm', m.version('vllm'))" \
    && vita-duplex --help > /dev/null \
    && vita-duplex smoke --help > /dev/null \
    && groupadd --gid 10001 vita \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin vita \
    && install -d -o vita -g vita /models /home/vita/.cache

# /home/vita/.cache is made above, owned by vita, so that a volume mounted there for the vLLM/torch caches
# is writable. Checkpoints are mounted at /models (read-only is fine). VITA_MODELS names the checkpoint
# directory (two comma-separated directories give the two engines different checkpoints).
VOLUME ["/models"]
ENV VITA_MODELS=/models/VITA-1.5 \
    VITA_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vita

# Numeric, so that Kubernetes' runAsNonRoot can verify it (10001 = the user `vita` made above).
USER 10001:10001
WORKDIR /home/vita
EXPOSE 8000

# /health answers as soon as the process serves (the engines load in the background; /ready says when
# they are loaded), so this is a liveness check. python3 is certain to be in the image; curl may not be.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VITA_PORT', '8000'), timeout=4)"]

# Settings come from VITA_* variables (see server/settings.py) or extra flags after the image name,
# e.g. `docker run ... vita-duplex --gpu-ids 0,1 --max-sessions 32`.
ENTRYPOINT ["vita-duplex", "serve", "--host", "0.0.0.0"]
