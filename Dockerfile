# dreambot on a CUDA GPU: docker build -t dreambot . && docker run --gpus all -e DISCORD_TOKEN \
#   -v dreambot-data:/srv/data -v hf-cache:/home/dreambot/.cache/huggingface \
#   -v $PWD/config.toml:/srv/config.toml:ro dreambot
# The Python CI tests with (3.11); torch and everything else come from requirements.lock, the same
# pins CI installs, so the image runs what was tested. PyPI's torch 2.13 wheels bundle CUDA 13: the
# host needs an NVIDIA driver of the R580 series or newer and the NVIDIA container toolkit.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/dreambot/.cache/huggingface

# libgl is not needed (headless OpenCV); libheif comes inside pillow-heif's wheel.
WORKDIR /opt/dreambot
# The lock first: the dependency layer is rebuilt only when the pins change.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY engine ./engine
# The lock holds every extra (gpu: bitsandbytes and xformers; ray: the image can be a machine of a
# Ray cluster with `ray start --address HEAD:6379 --block`; dev: pytest, to run the tests here).
RUN pip install --no-deps . && pip check

# tini as PID 1 hands `docker stop`'s SIGTERM to the bot, which checkpoints a running training,
# closes its Discord connection and exits within docker's 10 s; it also reaps orphaned processes.
# gcc and the C library headers: [model] compile's Triton builds its kernel launcher with a C compiler
# (without one the engine serves the UNet uncompiled, and says so in its log).
RUN apt-get update && apt-get install -y --no-install-recommends tini gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 dreambot \
    && mkdir -p /srv/data "$HF_HOME" \
    && chown -R dreambot:dreambot /srv "$HF_HOME"
USER dreambot
WORKDIR /srv
# data_dir defaults to "data", i.e. /srv/data; config.toml is read from /srv when mounted there.
VOLUME ["/srv/data", "/home/dreambot/.cache/huggingface"]
ENTRYPOINT ["tini", "--"]
CMD ["dreambot", "run"]
# Healthy while the bot is connected to Discord: it touches data/heartbeat every 20 s while it is.
HEALTHCHECK --interval=60s --timeout=20s --start-period=2m --retries=3 CMD ["dreambot", "health"]
