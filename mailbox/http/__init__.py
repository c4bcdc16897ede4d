"""The HTTP API (`/v1`) and the mailbox dashboard (`/ui`): `python -m mailbox serve`.

FastAPI on uvicorn, over the same facade as the CLI. It imports `tasks` only to publish
(`publishing.py`: dispatch.delay, the process's Mailbox whose waker publishes, the broker's
health), as DESIGN.md §2 says of this layer.

    app.py             create_app(mailbox, settings): routers, middleware, templates
    auth.py            bearer tokens, dashboard sessions, CSRF (the design is there)
    middleware.py      the auth gate and the body size limit, before any route
    errors.py          every failure as JSON (or an HTML page) with its status
    schemas.py         request bodies, the JSON form of records
    api_runs.py        submit, dispatches, runs, a thread's dispatches and messages
    api_control.py     cancel, interrupt, resume, a run's events (SSE)
    api_operations.py  dead letters, statistics, /healthz
    actions.py         what the API and the dashboard's forms both do
    sse.py             the event stream: formatting, following, keep-alives, threads
    health.py          reachability of the database, Redis and the broker
    ui_login.py        the dashboard's login
    ui_pages.py        the dashboard's pages
    ui_actions.py      the dashboard's forms and the run page's event stream
    server.py          serve(): settings, checks, uvicorn
    templates/, static/  Jinja2 templates, CSS, the run page's script
"""

from mailbox.http.app import create_app

__all__ = ["create_app"]
