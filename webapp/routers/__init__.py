"""Routers, one per resource: health, auth (sign-in pages), studies_api (JSON), pages (HTML)."""
