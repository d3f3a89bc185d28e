# orderstream image: one image for the API, the projector and the saga worker
# (docker-compose.yml picks the process with the command: api, project, worker).
#
#   docker build -t orderstream:local .
#   docker run --rm -p 8000:8000 orderstream:local            # `orderstream serve`: embedded backends
#   docker run --rm orderstream:local api --host 0.0.0.0 --port 8000

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build

# Dependencies first, read from pyproject.toml alone, so that a source change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt

# Then the project itself (a hatchling package: src/orderstream, projections).
COPY README.md ./
COPY src ./src
COPY projections ./projections
RUN pip install --no-deps . \
    && cd / && python -c "import orderstream.cli, orderstream.sagas.fulfilment.saga, projections"

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="orderstream" \
      org.opencontainers.image.description="Event-sourced CQRS order-fulfilment service" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORDERSTREAM_DATA_DIR=/var/lib/orderstream

RUN groupadd --system --gid 10001 orderstream \
    && useradd --system --uid 10001 --gid orderstream --no-create-home \
        --home-dir /var/lib/orderstream --shell /usr/sbin/nologin orderstream \
    && install -d -o orderstream -g orderstream -m 0750 /var/lib/orderstream

COPY --from=build /opt/venv /opt/venv

USER orderstream:orderstream
WORKDIR /var/lib/orderstream

EXPOSE 8000

# Only the HTTP processes (serve, api) answer this; docker-compose.yml disables it for the
# projector and the worker. No curl in the slim image: Python asks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["orderstream"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
