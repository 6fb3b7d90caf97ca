"""The digits model served by other serving frameworks, for ``bench/digits_floor.py``.

Each does the bare floor's work (``bench/floor_app.py``: Pillow decode, a resize to 28x28, one LiteRT
call) behind the framework's own server, so the comparison is the framework's overhead. They run in
their own environment, ``.venv-frameworks`` (``make .venv-frameworks/.installed``, from
``bench/requirements-frameworks.txt``): MLServer and LitServe pin their own FastAPI and uvicorn.
"""
