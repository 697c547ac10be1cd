"""Patient data never leaves the DICOM loader unless the user asks for it.

A copy of the real RG1_UNCR.dcm radiograph is given a header full of identifiers (each holding a marker
string no pixel, UID or default could contain by chance), then the shipped full edit workflow runs on it
through the real headless ComfyUI and through the headless runner CLI. Every file name and every byte under
the server's output and temp folders and the runner's output folder, the server log and the runner's
stdout/stderr are scanned: no marker may appear; that includes the export's audit trail (the provenance sidecar
JSON, the PNG's provenance text, the DICOM's private provenance block and the DICOM Segmentation). With
``keep_patient_data`` on, the exported DICOM and its Segmentation (and only they) hold the patient's name and ID.
The input file's *name* is no identifier (``case_0001.dcm``): the PNG's
workflow metadata names it, which is allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from PIL import Image
from test_workflows import by_type, small

from conftest import need
from cxr_counterfactual.runner.comfyui_path import PACK_ROOT

pytestmark = pytest.mark.slow

CASE = "case_0001.dcm"  # no identifier in the name: it is shown in the PNG's workflow, and that is allowed
# Element keyword -> value; every value holds a marker (searched case-insensitively).
IDENTIFIERS = {
    "PatientName": "ZZPATIENTQX^Jane",
    "PatientID": "ZZPIDQX93731",
    "PatientBirthDate": "19410317",  # a date holds no letters: 8 exact digits are marker enough
    "AccessionNumber": "ZZACCQX55821",
    "InstitutionName": "ZZINSTQX Infirmary",
    "InstitutionAddress": "12 ZZADDRQX Row",
    "ReferringPhysicianName": "ZZDOCQX^Ramona",
    "StudyDescription": "Chest for ZZPATIENTQX follow-up",
    "OtherPatientIDs": "ZZOTHERQX88213",
    "StudyID": "ZZSTUDYQX",
    "PatientAddress": "ZZADDRQX Lantern Row",
}
PRIVATE_VALUE = "ZZPRIVQX Jane"  # a private tag quoting a name (vendors do this)
REQUEST_ACCESSION = "ZZREQQX4412"  # a sequence item quoting an accession number
MARKERS = ("ZZPATIENTQX", "ZZPIDQX93731", "19410317", "ZZACCQX55821", "ZZINSTQX", "ZZADDRQX", "ZZDOCQX",
           "ZZOTHERQX88213", "ZZSTUDYQX", "ZZPRIVQX", "ZZREQQX4412")
KEPT = ("ZZPATIENTQX", "ZZPIDQX93731")  # what keep_patient_data=True must carry into the DICOM


def identified_dicom(path: Path) -> Path:
    """RG1_UNCR.dcm (a real PA radiograph, so the atlas fits it) with a header full of identifiers."""
    source = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(source is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    ds = pydicom.dcmread(source)
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0011, "ZZ VENDOR", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    item = pydicom.Dataset()
    item.AccessionNumber = REQUEST_ACCESSION
    ds.RequestAttributesSequence = [item]
    ds.save_as(path)
    raw = path.read_bytes().lower()
    assert all(m.lower().encode() in raw for m in MARKERS)  # the scan below would find each one
    return path


def found(text: str | bytes, markers=MARKERS) -> list[str]:
    blob = text.lower() if isinstance(text, bytes) else text.lower().encode("utf-8", "replace")
    return [m for m in markers if m.lower().encode() in blob]


def scan_file(path: Path, markers=MARKERS) -> list[str]:
    """Markers in the file's raw bytes, its PNG text chunks or its decoded DICOM header."""
    hits = found(path.read_bytes(), markers)
    if path.suffix.lower() == ".png":
        with Image.open(path) as im:
            hits += found(json.dumps(im.info, default=str), markers)
    if path.suffix.lower() == ".dcm":
        hits += found(str(pydicom.dcmread(path)), markers)
    return sorted(set(hits))


def scan_tree(root: Path, skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    """``{relative path: markers}`` for every file (name or content) under root holding a marker."""
    leaks: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*")):
        rel = str(path.relative_to(root))
        hits = found(rel)
        if path.is_file() and path not in skip:
            hits += scan_file(path)
        if hits:
            leaks[rel] = sorted(set(hits))
    return leaks


def edit_graph(checkpoint: Path, keep_patient_data: bool) -> dict:
    graph = small(json.loads((PACK_ROOT / "workflows" / "api" / "cxr_counterfactual_edit.json").read_text()),
                  checkpoint.name)
    (loader,) = by_type(graph, "CXRLoadDICOM")
    graph[loader]["inputs"]["dicom_file"] = CASE
    (export,) = by_type(graph, "CXRExportCounterfactual")
    graph[export]["inputs"].update(format="png+dicom", keep_patient_data=keep_patient_data)
    return graph


def server_leaks(server, skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    leaks = {f"{kind}/{rel}": hits for kind in ("output", "temp")
             for rel, hits in scan_tree(server.folders[kind], skip).items()}
    if hits := found(server.log_text()):
        leaks["server log"] = hits
    return leaks


def test_no_identifier_leaves_the_loader(comfy_server, tiny_checkpoint, pack_import_path, tmp_path):
    dicom = identified_dicom(tmp_path / CASE)
    comfy_server.upload_input(dicom)

    # 1. The workflow in ComfyUI, de-identified export.
    graph = edit_graph(tiny_checkpoint, keep_patient_data=False)
    result = comfy_server.run(graph)
    (export,) = by_type(graph, "CXRExportCounterfactual")
    (png,) = result.files(export)
    exported = pydicom.dcmread(png.with_suffix(".dcm"))
    assert exported.PatientIdentityRemoved == "YES" and not str(exported.get("PatientName", ""))
    trail = [png.with_suffix(".json"), png.with_name(png.name.replace("_.png", "_seg.dcm"))]
    assert all(p.is_file() for p in trail), "the audit trail the scan must cover was not written"

    # 2. The same workflow through the headless runner CLI (uploads over HTTP, fetches every output).
    workflow = tmp_path / "edit.json"
    workflow.write_text(json.dumps(graph))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(pack_import_path)}
    run = subprocess.run([sys.executable, "-m", "cxr_counterfactual", "run", str(workflow), "--server",
                          comfy_server.url, "--input", str(dicom), "--out", str(out), "--no-progress", "-v"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr
    assert any(p.suffix == ".dcm" for p in out.rglob("*")), "the runner fetched no DICOM to scan"
    fetched = {p.name for p in out.rglob("*")}
    assert any(n.endswith("-seg.dcm") for n in fetched) and any(n.startswith("export") and n.endswith(".json")
                                                                  for n in fetched), fetched

    leaks = server_leaks(comfy_server)
    leaks.update({f"runner/{rel}": hits for rel, hits in scan_tree(out).items()})
    for stream, text in (("runner stdout", run.stdout), ("runner stderr", run.stderr)):
        if hits := found(text):
            leaks[stream] = hits
    assert not leaks, f"patient data leaked: {leaks}"

    # 3. keep_patient_data=True: the user chose to keep it, so the DICOM holds it, and nothing else does.
    before = {p for p in comfy_server.folders["output"].rglob("*.dcm")}
    graph = edit_graph(tiny_checkpoint, keep_patient_data=True)
    result = comfy_server.run(graph)
    (png,) = result.files(export)
    kept = png.with_suffix(".dcm")
    assert kept not in before and sorted(scan_file(kept, KEPT)) == sorted(KEPT)
    header = pydicom.dcmread(kept)
    assert str(header.PatientName) == IDENTIFIERS["PatientName"] and header.PatientID == IDENTIFIERS["PatientID"]
    new_dicoms = {p for p in comfy_server.folders["output"].rglob("*.dcm")} - before
    leaks = server_leaks(comfy_server, skip=new_dicoms)
    assert not leaks, f"patient data leaked outside the kept DICOM: {leaks}"
