# dreambot on a CUDA GPU: docker build -t dreambot . && docker run --gpus all -e DISCORD_TOKEN \
#   -v dreambot-data:/srv/data -v hf-cache:/home/dreambot/.cache/huggingface \
#   -v $PWD/config.toml:/srv/config.toml:ro dreambot
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/dreambot/.cache/huggingface

# libgl is not needed (headless OpenCV); libheif comes inside pillow-heif's wheel.
WORKDIR /opt/dreambot
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY engine ./engine
# torch comes with the base image. bitsandbytes gives 8-bit Adam; xformers is left out because its
# wheels pin one exact torch release (installing it would replace the image's torch) and PyTorch's
# SDPA attention is about as fast on torch 2.
RUN pip install . bitsandbytes

RUN useradd --create-home --uid 1000 dreambot \
    && mkdir -p /srv/data "$HF_HOME" \
    && chown -R dreambot:dreambot /srv "$HF_HOME"
USER dreambot
WORKDIR /srv
# data_dir defaults to "data", i.e. /srv/data; config.toml is read from /srv when mounted there.
VOLUME ["/srv/data", "/home/dreambot/.cache/huggingface"]
CMD ["dreambot", "run"]
