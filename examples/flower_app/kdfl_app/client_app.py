"""The kdfl ClientApp (the client half of whatever algorithm the server's config names)."""

from kdfl.flower import make_client_app

app = make_client_app()
