# One image for every service of docker-compose.yml. The project runs from its root (/app):
# `mailbox` must resolve to this package, not the standard library's module of that name.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONPATH=/app PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir .
COPY celeryconfig.py ./
COPY mailbox ./mailbox
COPY tasks ./tasks
RUN useradd --create-home mailbox && mkdir -p /app/var && chown mailbox /app/var
USER mailbox
CMD ["celery", "-A", "tasks", "worker", "-l", "WARNING"]
