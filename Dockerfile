# The image fly.toml builds: `fly deploy` (or `docker build -t relay . && docker run -p 8080:8080 relay`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md relay.py ./
COPY plugins ./plugins
COPY static ./static
RUN pip install '.[postgres,auth]' && useradd --system --no-create-home relay \
    && mkdir /app/data && chown relay /app/data
# Session records: SQLite here by default (relay_plugins.sessions); DATABASE_URL switches to PostgreSQL.
ENV RELAY_SESSIONS_DB=/app/data/relay-sessions.db
USER relay
EXPOSE 8080
# PORT and HOST come from the environment (fly.toml sets PORT); SIGTERM drains, then exits 0.
CMD ["python", "relay.py"]
