"""Headless runs of the pack's API workflows: one graph, or a resumable dataset batch over several servers.

- :mod:`.client`: a ComfyUI server's HTTP and websocket API (submit, follow, upload, download);
  :mod:`.protocol`: its errors, progress events and results.
- :mod:`.graph`: API workflows, overrides by node title and input name, and the manifest's roles.
- :mod:`.manifest`: manifest CSV rows to jobs (graph + files to upload), with stable row keys.
- :mod:`.sweep`: ``--sweep`` settings to rows (the cartesian product per radiograph), checked before anything runs.
- :mod:`.provenance`: ``OUT/batch.json``, what started each batch (the report's provenance).
- :mod:`.worker`: one row on one server, outputs brought back as bytes.
- :mod:`.results`: a row's files and record, written atomically; the results CSV.
- :mod:`.batch`: the batch over servers (one thread and one in-flight prompt per server), retries.
- :mod:`.ray_backend`: the same batch on a Ray cluster (one actor per GPU, each owning a ComfyUI).
- :mod:`.cli`: ``python -m cxr_counterfactual run``.

Nothing here imports ``comfy`` or ``torch``: the runner talks to ComfyUI over HTTP only.
"""
