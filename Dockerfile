# One image for both roles: `shardkeeper agent run ...` and `shardkeeper coordinator run ...`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shardkeeper ./shardkeeper
COPY coordinator ./coordinator
COPY agents ./agents
RUN pip install --no-cache-dir .
RUN useradd --create-home shardkeeper && mkdir -p /data && chown shardkeeper /data
USER shardkeeper
ENTRYPOINT ["shardkeeper"]
