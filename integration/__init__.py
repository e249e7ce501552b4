"""End-to-end checks of bnfold with real third-party packages (``make integration``, issue 20).

Not part of the installed bnfold package, and not collected by pytest. ``integration.run`` (the
driver, plain Python) creates one virtual environment per client under ``.integration/``, runs
each ``integration.<client>_client`` module inside its own environment with a time limit, and
prints one Markdown table of the rows they write (one JSON object per case).
"""
