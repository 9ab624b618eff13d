"""The serving app on a running Ray cluster, through Ray's Serve REST API (the dashboard's
`/api/serve/applications/`, what Ray's own `serve deploy` / `status` / `shutdown` use), with
the cluster's token as for jobs.

Serve's REST config is declarative: a PUT replaces every application on the cluster. A
deploy therefore reads the applications already deployed, replaces (or adds) ours by name
and sends them all back, so deploying ftservice never takes down a neighbour's app; a
redeploy of the same name is an in-place upgrade that Serve rolls out replica by replica.

The cluster runs the app from its own installed ftservice (the image: see the Dockerfile and
cluster/kuberay/rayservice.yaml); the resolved serve spec travels as the builder's `args`, so
its paths (registries, the store's SQLite file, a local base) must be ones the cluster's
nodes see: a shared filesystem, a bucket URI, or a PostgreSQL store.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ftservice.errors import FtserviceError
from ftservice.jobs import dashboard_client
from ftservice.serve.spec import ServeSpec

IMPORT_PATH = "ftservice.serve.app:app_builder"
SETTLED = {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"}


class ServeDeployError(FtserviceError):
    """The cluster refused the Serve config, or has no such application."""


def connect(address: str | None, token_file: str | None = None):
    """A ServeSubmissionClient for the cluster's dashboard (token from the same places as
    `ftservice submit`)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return dashboard_client(ServeSubmissionClient, address, None, token_file)


def http_options(spec: ServeSpec) -> dict:
    """Serve's proxy options for a spec. The ingress answers 408 at the spec's deadline; the
    proxy's own timeout is a backstop a little later (it would answer without our body)."""
    return {
        "host": spec.host,
        "port": spec.port,
        "request_timeout_s": spec.limits.request_timeout_s + 5,
    }


def app_config(spec: ServeSpec) -> dict:
    """The application's entry in a Serve config: the builder and the resolved spec."""
    return {
        "name": spec.name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": spec.model_dump(mode="json"),
    }


def _details(client) -> dict:
    try:
        return client.get_serve_details()
    except RuntimeError as e:
        raise ServeDeployError(f"the cluster's Serve API answered: {e}") from None


def deploy(client, spec: ServeSpec) -> None:
    """Deploy (or upgrade in place) the app, keeping the cluster's other applications."""
    details = _details(client)
    apps = []
    for name, app in (details.get("applications") or {}).items():
        if name == spec.name:
            continue
        if not app.get("deployed_app_config"):
            raise ServeDeployError(
                f"the application '{name}' on this cluster was started from Python "
                "(serve.run), not from a config; Serve cannot mix the two: shut it down "
                "first (`ftservice serve shutdown --name NAME`) or deploy it by config"
            )
        apps.append(app["deployed_app_config"])
    config = {"http_options": http_options(spec), "applications": [*apps, app_config(spec)]}
    try:
        client.deploy_applications(config)
    except RuntimeError as e:
        raise ServeDeployError(f"the cluster refused the Serve config: {e}") from None


def status(client) -> dict:
    """Every application on the cluster: its status, message and deployments."""
    out = {}
    for name, app in (_details(client).get("applications") or {}).items():
        out[name] = {
            "status": app.get("status"),
            "message": app.get("message") or "",
            "route_prefix": app.get("route_prefix"),
            "deployments": {
                d: {
                    "status": info.get("status"),
                    "replicas": len(info.get("replicas") or []),
                    "message": info.get("message") or "",
                }
                for d, info in (app.get("deployments") or {}).items()
            },
        }
    return out


def wait(
    client, name: str, timeout_s: float, progress: Callable[[str], None] = print
) -> str | None:
    """Poll until the app is RUNNING or failed, or timeout_s passes; reports each change of
    status. Returns the last status (None: not on the cluster)."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        app = status(client).get(name)
        state = app["status"] if app else None
        if state != last:
            message = f": {app['message']}" if app and app["message"] else ""
            progress(f"{name}: {state or 'not deployed yet'}{message}")
            last = state
        if state in SETTLED or time.monotonic() >= deadline:
            return state
        time.sleep(1.0)


def shutdown(client, name: str | None = None) -> list[str]:
    """Delete one application (the others are sent back unchanged) or, with no name, all of
    Serve on the cluster. Returns the names removed."""
    details = _details(client)
    apps = details.get("applications") or {}
    if name is None:
        client.delete_applications()
        return sorted(apps)
    if name not in apps:
        raise ServeDeployError(
            f"no Serve application '{name}' on this cluster; `ftservice serve status` lists "
            f"them ({', '.join(sorted(apps)) or 'none'})"
        )
    rest = [a["deployed_app_config"] for n, a in apps.items() if n != name]
    if not rest:
        client.delete_applications()
        return [name]
    if not all(rest):
        raise ServeDeployError(
            "another application on this cluster was started from Python (serve.run); "
            "Serve cannot remove one config application beside it: shut down all of Serve"
        )
    config = {"http_options": details.get("http_options") or {}, "applications": rest}
    try:
        client.deploy_applications(config)
    except RuntimeError as e:
        raise ServeDeployError(f"the cluster refused the Serve config: {e}") from None
    return [name]
