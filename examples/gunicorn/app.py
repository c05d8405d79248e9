"""A WSGI app that reproduces the saturation incident under gunicorn's sync workers.

Every request holds one worker for its whole duration. /slow takes SLOW_SECONDS (default 3,
standing in for the incident's 3-minute requests), /fast and /health a few milliseconds. With
all workers busy on /slow, /health waits in the listen backlog like any request, so a liveness
probe aimed at the app fails and Kubernetes restarts a pod that was only busy.
"""
import os
import time

SLOW_SECONDS = float(os.environ.get("SLOW_SECONDS", "3"))


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/slow"):
        time.sleep(SLOW_SECONDS)
        body = b"slow done\n"
    elif path == "/health":
        body = b"ok\n"
    else:
        time.sleep(0.005)
        body = b"fast done\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
