"""Adaptation through ``samsegment serve`` and its client (issue 16): the ``adapt`` job runs the
engine's own ``SegmentationSession.adapt``; the adapter travels as a signed file (GET/PUT/DELETE
``/v1/sessions/{sid}/adapter``), is refused when damaged or signed elsewhere, and comes back by
itself into the session a restarted server reopens.

A real uvicorn server runs on 127.0.0.1 in this process with the real LiteMedSAM backend (one
adaptation shared by the module's tests); the restart test runs ``samsegment serve`` processes.
Every adapter key lives in a temporary folder (``$SAMSEGMENT_ADAPTER_KEY``), never in the user's
configuration.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from phantoms import box_of, ellipsoid_ct  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from SAMSegmentLib.adaptation import KEY_ENV, MAGIC, AdaptationReport, AdaptSettings, DecoderAdapter  # noqa: E402
from SAMSegmentLib.client import AdapterNotRestored, RemoteSession  # noqa: E402
from SAMSegmentLib.errors import CancelledError, CheckpointError, SAMSegmentError  # noqa: E402
from SAMSegmentLib.prompts import Prompts  # noqa: E402
from SAMSegmentLib.server.serve import ServerHandle  # noqa: E402
from SAMSegmentLib.server.state import Limits, ServerState  # noqa: E402
from SAMSegmentLib.session import SegmentationSession  # noqa: E402
from SAMSegmentLib.volume import SliceRef  # noqa: E402
from SAMSegmentLib.wire import mask_to_json  # noqa: E402

TOKEN = "test-token-adaptation-0123456789"
ACCEPTED = (5, 6, 7)  # slice 6 is held back
PROBES = (3, 4, 8)  # slices decoded to compare the models
# small and forced: two steps, one more on every slice, kept whatever the held-back check says
KEPT = AdaptSettings(check_steps=2, final_steps=1, learning_rate=1e-3, min_gain=-1.0, mirror_min_gain=-1.0)


def http(method: str, url: str, data: bytes | None = None, json: object = None, timeout: float = 60.0):
    import json as jsonlib

    from SAMSegmentLib.http_transport import request

    headers = {"Authorization": f"Bearer {TOKEN}"}
    if json is not None:
        data = jsonlib.dumps(json).encode()
        headers["Content-Type"] = "application/json"
    return request(url, method, data, headers, timeout)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    """This module's adapter key ($SAMSEGMENT_ADAPTER_KEY), made on first use in a temporary folder."""
    path = tmp_path_factory.mktemp("adapter-key") / "adapter-signing.key"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def server(backend, key_file):
    state = ServerState(Limits(max_volume_voxels=2_000_000, max_request_bytes=64 << 20), backends=(backend,))
    with ServerHandle(state, TOKEN) as handle:
        yield handle


@pytest.fixture(scope="module")
def scan():
    """A small phantom (12 slices of 64 x 64) and its mask."""
    return ellipsoid_ct(shape=(12, 64, 64), radii=(4.0, 18.0, 22.0))


def probe(session, truth) -> dict[int, tuple[np.ndarray, float]]:
    """(mask, score) of a box prompt on each probe slice."""
    out = {}
    for index in PROBES:
        pred = session.predict(SliceRef(0, index), Prompts(box=np.array(box_of(truth[index]))), refine=False)
        out[index] = (np.asarray(pred.mask), float(pred.score))
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[i][0], b[i][0]) and abs(a[i][1] - b[i][1]) < 1e-5 for i in a)


@pytest.fixture(scope="module")
def adapted(server, scan):
    """One adaptation on the server, shared: (client, report, progress seen, stock probes, adapted probes)."""
    volume, truth = scan
    client = RemoteSession(server.url, TOKEN)
    client.set_volume(volume)
    stock = probe(client, truth)
    seen = []
    report = client.adapt(0, {i: truth[i] for i in ACCEPTED}, "blob", KEPT,
                          progress=lambda done, total, message: seen.append((done, total)))
    yield client, report, seen, stock, probe(client, truth)
    client.close()


@pytest.mark.slow
def test_adapt_job_reports_as_the_engine_and_decodes_through_the_adapter(adapted, backend, scan):
    client, report, seen, stock, tuned = adapted
    volume, truth = scan
    assert report.kept and client.adapter_in_use
    assert report.slices == ACCEPTED and report.held_back == "slice 6" and report.structure == "blob"
    assert report.steps == 3 and report.prompts_per_step == 2 * len(ACCEPTED)
    assert seen and seen[-1] == (3, 3)
    assert not same(tuned, stock)  # the server decodes through the adapter now
    with SegmentationSession(model=backend) as local:  # the engine in-process, same settings
        local.set_volume(volume)
        expected = local.adapt(0, {i: truth[i] for i in ACCEPTED}, "blob", KEPT)
        assert local.adapter is not None and same(probe(local, truth), tuned)
        local.use_stock_model()
        assert same(probe(local, truth), stock)
    got, want = report.as_json(), expected.as_json()
    for name in ("kept", "axis", "slices", "held_back", "steps", "prompts_per_step", "structure"):
        assert got[name] == want[name], name
    for name in ("held_back_dice_stock", "held_back_dice_adapted"):
        assert got[name] == pytest.approx(want[name], abs=1e-3), name
    assert AdaptationReport.from_json(got) == report


@pytest.mark.slow
def test_adapter_get_delete_put_round_trip(adapted, server, backend, scan, key_file):
    client, report, _, stock, tuned = adapted
    volume, truth = scan
    data = client.adapter_file_bytes()
    assert data is not None and data.startswith(MAGIC)
    adapter = DecoderAdapter.from_bytes(data, key_file.read_bytes().strip())  # signed with the server's key
    assert adapter.structure == "blob" and adapter.report["summary"] == report.summary()
    raw = http("GET", f"{server.url}/v1/sessions/{client.session_id}/adapter")
    assert raw.status == 200 and raw.headers["content-type"] == "application/octet-stream"

    client.use_stock_model()
    assert not client.adapter_in_use and client.adapter_file_bytes() is None
    assert same(probe(client, truth), stock)
    none = http("GET", f"{server.url}/v1/sessions/{client.session_id}/adapter")
    assert none.status == 404 and none.json()["problem"] and none.json()["remedy"]

    loaded = client.load_adapter_file_bytes(data, source="blob.samadapter")
    assert loaded["structure"] == "blob" and loaded["report"]["kept"] and client.adapter_in_use
    assert same(probe(client, truth), tuned)
    with SegmentationSession(model=backend) as local:  # the file decodes the same in-process
        local.set_volume(volume)
        local.load_adapter_file_bytes(data, key_file.read_bytes().strip())
        assert same(probe(local, truth), tuned)


@pytest.mark.slow
def test_damaged_foreign_and_oversized_adapters_are_refused(adapted, server, backend, scan):
    import pickle

    client, _, _, _, tuned = adapted
    volume, truth = scan
    data = client.adapter_file_bytes()
    url = f"{server.url}/v1/sessions/{client.session_id}/adapter"
    tampered = bytearray(data)
    tampered[-100] ^= 0x01  # one bit of one tensor
    answer = http("PUT", url, data=bytes(tampered))
    assert answer.status == 400 and "do not match its signed digest" in answer.json()["problem"]
    assert answer.json()["remedy"] and answer.json()["type"] == "CheckpointError"
    with pytest.raises(CheckpointError, match="damaged"):
        client.load_adapter_file_bytes(bytes(tampered), source="tampered.samadapter")
    adapter = DecoderAdapter.from_bytes(data, Path(os.environ[KEY_ENV]).read_bytes().strip())
    with pytest.raises(CheckpointError, match="elsewhere") as foreign:
        client.load_adapter_file_bytes(adapter.to_bytes(secrets.token_bytes(32)), source="foreign.samadapter")
    assert "foreign.samadapter" in foreign.value.problem and "SAMSEGMENT_ADAPTER_KEY" in foreign.value.remedy
    other_weights = DecoderAdapter(adapter.model_id, "0" * 64, adapter.tensors, adapter.structure)
    with pytest.raises(CheckpointError, match="other litemedsam weights"):
        client.load_adapter_file_bytes(other_weights.to_bytes(Path(os.environ[KEY_ENV]).read_bytes().strip()))
    for junk in (pickle.dumps({"tensors": 1}), b"", MAGIC + b"\xff" * 8):
        answer = http("PUT", url, data=junk)
        assert answer.status == 400 and answer.json()["problem"] and answer.json()["remedy"], junk[:20]
    # the refusals changed nothing: the session still decodes through the adapter it had
    assert client.adapter_in_use and client.adapter_file_bytes() == data
    assert same(probe(client, truth), tuned)

    small = ServerState(Limits(max_adapter_bytes=1000), backends=(backend,))
    with ServerHandle(small, TOKEN) as handle, RemoteSession(handle.url, TOKEN) as other:
        other.set_volume(volume)
        answer = http("PUT", f"{handle.url}/v1/sessions/{other.session_id}/adapter", data=data)
        assert answer.status == 413 and "1000 bytes" in answer.json()["problem"]
        assert not other.adapter_in_use and other.adapter_file_bytes() is None


@pytest.mark.slow
def test_bad_adapt_requests_are_refused_with_the_engines_message(server, scan):
    volume, truth = scan
    with RemoteSession(server.url, TOKEN) as client:
        client.set_volume(volume)
        cases = [
            ({}, "at least one slice"),
            ({5: np.zeros_like(truth[5])}, "is empty"),
            ({40: truth[5]}, "outside the volume"),
        ]
        for accepted, message in cases:
            with pytest.raises(SAMSegmentError, match=message):
                client.adapt(0, accepted, settings=KEPT)
        with pytest.raises(SAMSegmentError, match="check_steps"):
            client.adapt(0, {5: truth[5]}, settings={"check_steps": 0})
        with pytest.raises(SAMSegmentError, match="Unknown settings field"):
            client.adapt(0, {5: truth[5]}, settings={"epochs": 3})
        url = f"{server.url}/v1/sessions/{client.session_id}/jobs"
        for body in ({"kind": "adapt", "axis": 0, "accepted": {"5": {"shape": [3, 3], "bits": "AA=="}}},
                     {"kind": "adapt", "axis": 7, "accepted": {"5": mask_to_json(truth[5])}},
                     {"kind": "adapt", "axis": 0, "accepted": {"5": mask_to_json(truth[5])}, "structure": 3}):
            answer = http("POST", url, json=body)
            assert 400 <= answer.status < 500 and answer.json()["problem"] and answer.json()["remedy"], body
        assert not client.adapter_in_use and client.adapter_file_bytes() is None


@pytest.mark.slow
def test_a_cancelled_adaptation_leaves_the_model_as_it_was(server, scan):
    from SAMSegmentLib.worker import CancelToken

    volume, truth = scan
    with RemoteSession(server.url, TOKEN) as client:
        client.set_volume(volume)
        cancel = CancelToken()
        seen = []

        def progress(done, total, message):
            seen.append(done)
            cancel.cancel()

        t0 = time.monotonic()
        with pytest.raises(CancelledError, match="cancelled"):
            client.adapt(0, {i: truth[i] for i in ACCEPTED}, settings=AdaptSettings(check_steps=200), progress=progress,
                         cancel=cancel)
        assert time.monotonic() - t0 < 60 and seen and max(seen) < 200
        assert not client.adapter_in_use and client.adapter_file_bytes() is None


@pytest.mark.slow
def test_set_volume_forgets_the_adapter(adapted, server, scan):
    client, _, _, stock, _ = adapted
    volume, truth = scan
    data = client.adapter_file_bytes()
    with RemoteSession(server.url, TOKEN) as other:
        other.set_volume(volume)
        other.load_adapter_file_bytes(data)
        assert other.adapter_in_use
        other.set_volume(volume)  # the same scan again: a new session, the stock model
        assert not other.adapter_in_use and other.adapter_file_bytes() is None
        assert same(probe(other, truth), stock)


@pytest.mark.slow
def test_a_restarted_server_gets_the_adapter_back(tmp_path, scan):
    volume, truth = scan
    server = ServerProcess(tmp_path, token=TOKEN, env={KEY_ENV: str(tmp_path / "site.key")}).start()
    try:
        client = RemoteSession(server.url, TOKEN, timeout=60)
        client.set_volume(volume)
        stock = probe(client, truth)
        assert client.adapt(0, {i: truth[i] for i in ACCEPTED}, settings=KEPT).kept
        tuned = probe(client, truth)
        assert not same(tuned, stock)

        server.kill()
        server.start()  # the same key file: the adapter it signed is accepted again
        client.retarget(server.url, TOKEN)
        assert same(probe(client, truth), tuned)  # the session was reopened with the adapter put back
        assert client.adapter_in_use and client.adapter_file_bytes() is not None

        server.kill()
        server.env[KEY_ENV] = str(tmp_path / "another.key")  # a server with another key cannot verify it: said, not silent
        server.start()
        client.retarget(server.url, TOKEN)
        with pytest.raises(AdapterNotRestored, match="refused the adapted decoder") as refused:
            probe(client, truth)
        assert "SAMSEGMENT_ADAPTER_KEY" in refused.value.remedy
        assert not client.adapter_in_use
        assert same(probe(client, truth), stock)  # from then on the stock model, as the error said
        client.close()
    finally:
        server.stop()
