"""The ingress's FastAPI app, shared by the modules that add routes to it (Serve turns the
routes of the Ingress class and its bases into the ingress's handlers)."""

from fastapi import FastAPI

api = FastAPI(title="ftservice", docs_url=None, redoc_url=None)
