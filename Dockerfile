# BeTrace worker image. Build: docker build -t betrace:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c requirements.lock . \
    && useradd --create-home --uid 10001 betrace \
    && mkdir -p /data && chown betrace /data
COPY config/rules ./config/rules
USER betrace
ENV BETRACE_DATA_DIR=/data BETRACE_RULES_DIR=/app/config/rules BETRACE_WEB_BIND=0.0.0.0
EXPOSE 6066
ENTRYPOINT ["betrace"]
CMD ["run"]
