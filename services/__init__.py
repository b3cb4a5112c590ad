"""The FIRST services: gateway, router, scaler and worker, and the ``first`` command that runs them."""
