"""``python -m cxr_counterfactual report OUT_DIR``: one self-contained HTML report of a batch's output folder.

Reads what the headless runner wrote (``results.csv``, ``rows/<key>/row.json`` and the row files, ``batch.json``)
and never writes into that folder. Imports ``imaging`` (radiograph reading, the Fréchet distance) and ``errors``,
never ComfyUI, the hosts, the nodes or the runner: the folder's layout is the contract (see :mod:`.folder`), so
the report works without the runner's network dependencies. matplotlib (the ``report`` extra) draws the plots;
without it the report still renders its tables and says how to install it.
"""
