"""The headless runner talks only to the servers it is given: every socket the CLI opens, and every name it
resolves, is recorded by a Python audit hook (``socket.connect`` / ``socket.getaddrinfo``) in the runner's own
process, for a single run and for a manifest batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pydicom.data
import pytest
from test_runner import small, write_manifest

from conftest import need

pytestmark = pytest.mark.slow

# Loaded by the runner's interpreter before anything else (sitecustomize), appends one JSON line per event.
AUDIT = '''
import json, os, sys
_log = os.environ["CXR_NET_AUDIT"]
def _hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto"):
        addr = args[1] if event != "socket.getaddrinfo" else args[:2]
        with open(_log, "a") as f:
            f.write(json.dumps([event, repr(addr)]) + "\\n")
sys.addaudithook(_hook)
'''


def audited_cli(pack_import_path: Path, hook_dir: Path, log: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook_dir), str(pack_import_path)]),
           "CXR_NET_AUDIT": str(log)}
    return subprocess.run([sys.executable, "-m", "cxr_counterfactual", "run", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def events(log: Path) -> list[tuple[str, str]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []


def test_runner_connects_only_to_the_given_server(comfy_server, tiny_checkpoint, pack_import_path, data_dir,
                                                  chexmask_example, tmp_path):
    dicom = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(dicom is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT)
    server = urllib.parse.urlsplit(comfy_server.url)
    allowed = {repr((server.hostname, server.port))}  # what connect and getaddrinfo record for the server

    single, batch = tmp_path / "single.jsonl", tmp_path / "batch.jsonl"
    one = audited_cli(pack_import_path, hook_dir, single, "cxr_dicom_masked_edit", "--server", comfy_server.url,
                      "--input", dicom, "--out", str(tmp_path / "one"), "--set", "Fit to model.max_side=64",
                      "--set", "Sampler.steps=2", "--set", f"CXR checkpoint.ckpt_name={tiny_checkpoint.name}")
    assert one.returncode == 0, one.stderr
    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=[1, 2])
    many = audited_cli(pack_import_path, hook_dir, batch, "cxr_chexmask_edit", "--manifest", str(manifest),
                       "--server", comfy_server.url, "--out", str(tmp_path / "many"), *small(tiny_checkpoint))
    assert many.returncode == 0, many.stderr

    for log in (single, batch):
        seen = events(log)
        assert any(e == "socket.connect" and a in allowed for e, a in seen), f"no connection recorded: {seen[:5]}"
        strangers = [(e, a) for e, a in seen if a not in allowed]
        assert not strangers, f"the runner reached beyond {comfy_server.url}: {strangers}"
