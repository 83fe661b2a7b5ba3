"""``samsegment serve`` and its client: same masks as the engine in-process, clear refusals.

A real uvicorn server runs on 127.0.0.1 (a free port) in this process with the real LiteMedSAM
backend; every request loop here is bounded and the server stops at the end of the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")

from phantoms import box_of, ellipsoid_ct  # noqa: E402
from SAMSegmentLib.client import (AuthenticationFailed, RemoteSession, ServerOverloaded,  # noqa: E402
                                  ServerUnreachable, VersionMismatch)
from SAMSegmentLib.errors import PromptError, SAMSegmentError  # noqa: E402
from SAMSegmentLib.propagation import StopRules, propagate  # noqa: E402
from SAMSegmentLib.prompts import Prompts  # noqa: E402
from SAMSegmentLib.server.serve import ServerHandle, resolve_token  # noqa: E402
from SAMSegmentLib.server.state import Limits, ServerState  # noqa: E402
from SAMSegmentLib.session import SegmentationSession  # noqa: E402
from SAMSegmentLib.volume import SliceRef  # noqa: E402
from SAMSegmentLib.wire import VolumeReceiver, array_to_npy, mask_from_json, mask_to_json, volume_id  # noqa: E402

TOKEN = "test-token-0123456789abcdef"


def http(method: str, url: str, json: object = None, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 60.0):
    """A raw HTTP call (the project's own transport), for requests the client would never send."""
    import json as jsonlib

    from SAMSegmentLib.http_transport import request

    headers = dict(headers or {})
    if json is not None:
        data = jsonlib.dumps(json).encode()
        headers["Content-Type"] = "application/json"
    return request(url, method, data, headers, timeout)


@pytest.fixture(scope="module")
def server(backend):
    state = ServerState(Limits(max_volume_voxels=2_000_000, max_request_bytes=64 << 20), backends=(backend,))
    with ServerHandle(state, TOKEN) as handle:
        yield handle


@pytest.fixture(scope="module")
def phantom_volume():
    return ellipsoid_ct()


@pytest.fixture
def remote(server):
    with RemoteSession(server.url, TOKEN) as client:
        yield client


def anchor_box(truth: np.ndarray) -> tuple[int, list[float]]:
    index = int(np.argmax(truth.sum(axis=(1, 2))))
    return index, box_of(truth[index])


@pytest.mark.slow
def test_prompt_refine_undo_match_the_engine_in_process(server, remote, backend, phantom_volume):
    volume, truth = phantom_volume
    index, box = anchor_box(truth)
    ref = SliceRef(0, index)
    with SegmentationSession(model=backend) as local:
        local.set_volume(volume)
        window = remote.set_volume(volume)
        assert (window.low, window.high) == (local.window.low, local.window.high)
        expected = local.predict(ref, Prompts(box=np.array(box)))
        got = remote.predict(ref, Prompts(box=np.array(box)))
        assert np.array_equal(got.mask, expected.mask) and got.score == pytest.approx(expected.score, abs=1e-6)
        centre = np.argwhere(truth[index]).mean(axis=0)[::-1]
        refined = Prompts(np.array([centre]), np.array([0]), np.array(box))  # an exclude click refines
        expected2 = local.predict(ref, refined)
        got2 = remote.predict(ref, refined)
        assert np.array_equal(got2.mask, expected2.mask)
        back = remote.undo(ref)
        assert np.array_equal(back.mask, got.mask)


@pytest.mark.slow
def test_propagation_streams_the_engines_slices(server, remote, backend, phantom_volume):
    volume, truth = phantom_volume
    index, box = anchor_box(truth)
    ref = SliceRef(0, index)
    with SegmentationSession(model=backend) as local:
        local.set_volume(volume)
        anchor = local.predict(ref, Prompts(box=np.array(box))).mask
        expected = propagate(local, 0, {index: anchor}, "both", rules=StopRules(max_slices=4))
    remote.set_volume(volume)
    seen = []
    result = remote.propagate(0, {index: anchor}, "both", rules=StopRules(max_slices=4),
                              on_slice=lambda r, mask, item: seen.append(r.index))
    assert sorted(seen) == sorted(expected.masks) and len(seen) == len(set(seen))
    for i, mask in expected.masks.items():
        assert np.array_equal(result.masks[i], mask)
    assert result.stops == expected.stops and result.outcomes == expected.outcomes
    assert np.array_equal(result.to_volume(volume.shape, {index: anchor}), expected.to_volume(volume.shape,
                                                                                             {index: anchor}))


@pytest.mark.slow
def test_a_3d_box_and_box_anchors_propagate_on_the_server_as_in_process(server, remote, backend, phantom_volume):
    """The 3D box (Slicer's ROI, --box3d) and boxes on several slices travel as plain JSON; the server
    runs the engine's own propagation with them (same slices, same masks); a bad box is a 4xx."""
    from SAMSegmentLib.box3d import Box3D

    volume, truth = phantom_volume
    bounds = Box3D.from_mask(truth)
    k0, k1 = bounds.lo[0], bounds.hi[0]
    boxes = {k0 + 1: box_of(truth[k0 + 1]), k1 - 1: box_of(truth[k1 - 1])}
    with SegmentationSession(model=backend) as local:
        local.set_volume(volume)
        expected_3d = propagate(local, 0, None, "both", bounds=bounds)
        expected_boxes = propagate(local, 0, None, "both", boxes=boxes)
    remote.set_volume(volume)
    for expected, kwargs in ((expected_3d, {"bounds": bounds}), (expected_boxes, {"boxes": boxes})):
        got = remote.propagate(0, None, "both", **kwargs)
        assert sorted(got.masks) == sorted(expected.masks) and got.masks
        for i, mask in expected.masks.items():
            assert np.array_equal(got.masks[i], mask), i
    with pytest.raises(SAMSegmentError, match="empty"):
        remote.propagate(0, None, "both", bounds={"lo": [5, 0, 0], "hi": [2, 10, 10]})
    with pytest.raises(SAMSegmentError, match="4 numbers"):
        remote.propagate(0, None, "both", boxes={3: [1.0, 2.0, 3.0]})


@pytest.mark.slow
def test_two_clients_share_embeddings_by_content(server, phantom_volume):
    volume, truth = phantom_volume
    index, box = anchor_box(truth)
    ref = SliceRef(0, index + 1)
    with RemoteSession(server.url, TOKEN) as a, RemoteSession(server.url, TOKEN) as b:
        a.set_volume(volume)
        b.set_volume(volume.copy())
        first = a.predict(ref, Prompts(box=np.array(box)))
        state = server.state
        encodes = sum(c.session.encode_count for c in state._sessions.values())
        second = b.predict(ref, Prompts(box=np.array(box)))
        assert np.array_equal(first.mask, second.mask)
        assert sum(c.session.encode_count for c in state._sessions.values()) == encodes  # b encoded nothing


@pytest.mark.slow
def test_cancelled_propagation_stops_and_keeps_what_was_sent(server, remote, phantom_volume):
    from SAMSegmentLib.worker import CancelToken

    volume, truth = phantom_volume
    index, box = anchor_box(truth)
    remote.set_volume(volume)
    anchor = remote.predict(SliceRef(0, index), Prompts(box=np.array(box))).mask
    cancel = CancelToken()
    got = []

    def on_slice(r, mask, item):
        got.append(r.index)
        cancel.cancel()

    result = remote.propagate(0, {index: anchor}, "up", on_slice=on_slice, cancel=cancel)
    assert result.cancelled and 1 <= len(result.masks) < truth.any(axis=(1, 2)).sum()
    assert sorted(result.masks) == sorted(got)


@pytest.mark.slow
def test_research_jobs_match_the_engine(server, remote, backend):
    from phantoms import disks_ct

    from SAMSegmentLib.automatic import EverythingParams, everything_slice, regions_to_labels
    from SAMSegmentLib.uncertainty import prompt_uncertainty

    volume, masks = disks_ct()
    ref = SliceRef(0, 0)
    params = EverythingParams(points_per_side=4)
    remote.set_volume(volume)
    labels = remote.everything(0, 0, params={"points_per_side": 4})
    box = Prompts(box=np.array(box_of(masks[0])))
    probability, uncertainty = remote.prompt_uncertainty(ref, box, n=4)
    with SegmentationSession(model=backend) as local:
        local.set_volume(volume)
        expected = regions_to_labels(everything_slice(local, ref, params), volume.shape[1:])
        p_local, u_local = prompt_uncertainty(local, ref, box, n=4)
    assert np.array_equal(labels, expected)
    assert np.allclose(probability, p_local, atol=1e-5) and np.allclose(uncertainty, u_local, atol=1e-5)


@pytest.mark.slow
def test_bad_requests_get_the_engines_error_and_remedy(server, remote, phantom_volume):
    volume, truth = phantom_volume
    remote.set_volume(volume)
    with pytest.raises(PromptError, match="box"):  # box-only model, a point alone
        remote.predict(SliceRef(0, 3), Prompts(np.array([[10.0, 10.0]]), np.array([1])))
    with pytest.raises(SAMSegmentError, match="outside|beyond|range"):
        remote.predict(SliceRef(0, 999), Prompts(box=np.array([1.0, 1.0, 20.0, 20.0])))

    url, auth = server.url, {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("post", f"/v1/sessions/{remote.session_id}/predict", {"data": b"not json"}),
        ("post", f"/v1/sessions/{remote.session_id}/predict", {"json": {"axis": "x", "index": 1}}),
        ("post", f"/v1/sessions/{remote.session_id}/predict",
         {"json": {"axis": 0, "index": 3, "prompts": {"box": [1, 2, "nan", 4]}}}),
        ("post", f"/v1/sessions/{remote.session_id}/jobs", {"json": {"kind": "format_disk"}}),
        ("post", f"/v1/sessions/{remote.session_id}/jobs", {"json": {"kind": "propagate", "axis": 0, "anchors": {}}}),
        ("post", "/v1/sessions/nope/predict", {"json": {"axis": 0, "index": 1}}),
        ("get", "/v1/jobs/nope", {}),
        ("post", "/v1/sessions", {"json": {"volume_id": "0" * 64}}),
        ("post", "/v1/sessions", {"json": {"volume_id": volume_id(volume), "model": "no_such_model"}}),
    ]
    for method, path, kwargs in cases:
        response = http(method.upper(), url + path, headers=auth, **kwargs)
        assert 400 <= response.status < 500, (path, response.status, response.body)
        body = response.json()
        assert body["problem"] and body["remedy"] and b"Traceback" not in response.body, body


@pytest.mark.slow
def test_uploads_are_checked_and_never_unpickled(server):

    auth = {"Authorization": f"Bearer {TOKEN}"}
    good = np.zeros((4, 8, 8), np.int16)
    wrong_id = http("PUT", f"{server.url}/v1/volumes/{'1' * 64}", data=array_to_npy(good), headers=auth)
    assert wrong_id.status == 400 and "do not match" in wrong_id.json()["problem"]
    objects = np.array([{"a": 1}, None, 3], dtype=object).reshape(1, 1, 3)
    import io
    import pickle

    buffer = io.BytesIO()
    np.save(buffer, objects, allow_pickle=True)  # a pickle inside .npy
    evil = http("PUT", f"{server.url}/v1/volumes/{'2' * 64}", data=buffer.getvalue(), headers=auth)
    assert evil.status == 400 and "dtype object is not accepted" in evil.json()["problem"]
    raw = http("PUT", f"{server.url}/v1/volumes/{'3' * 64}", data=pickle.dumps(good), headers=auth)
    assert raw.status == 400
    big = np.zeros((20, 400, 400), np.uint8)  # 3.2 M voxels > the fixture's 2 M limit
    too_big = http("PUT", f"{server.url}/v1/volumes/{volume_id(big)}", data=array_to_npy(big), headers=auth)
    assert too_big.status == 413 and too_big.json()["remedy"]
    flat = http("PUT", f"{server.url}/v1/volumes/{'4' * 64}", data=array_to_npy(np.zeros((3, 3), np.int16)),
                headers=auth)
    assert flat.status == 400 and "2 dimensions, not 3" in flat.json()["problem"]
    short = http("PUT", f"{server.url}/v1/volumes/{volume_id(good)}", data=array_to_npy(good)[:-10], headers=auth)
    assert short.status == 400 and "ended early" in short.json()["problem"]
    long = http("PUT", f"{server.url}/v1/volumes/{volume_id(good)}", data=array_to_npy(good) + b"x", headers=auth)
    assert long.status == 400 and "more bytes" in long.json()["problem"]
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(np.zeros((2, 3, 4), np.int16)))  # fortran_order: True in the header
    fortran = http("PUT", f"{server.url}/v1/volumes/{'5' * 64}", data=buffer.getvalue(), headers=auth)
    assert fortran.status == 400 and "Fortran order" in fortran.json()["problem"]


@pytest.mark.slow
def test_authentication_and_versions(server, phantom_volume):

    assert http("GET", f"{server.url}/v1/info").json()["api_version"] == 1  # public
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = http("POST", f"{server.url}/v1/sessions", json={}, headers=headers)
        assert response.status == 401 and "token" in response.json()["problem"]
    with pytest.raises(AuthenticationFailed):
        RemoteSession(server.url, "wrong-token").set_volume(phantom_volume[0])
    with pytest.raises(ServerUnreachable, match="Cannot reach"):
        RemoteSession("http://127.0.0.1:9", TOKEN, timeout=5)
    import SAMSegmentLib.client as client_module

    original = client_module.API_VERSION
    client_module.API_VERSION = original + 1
    try:
        with pytest.raises(VersionMismatch, match="API v1"):
            RemoteSession(server.url, TOKEN)
    finally:
        client_module.API_VERSION = original


def test_bind_rules():
    assert resolve_token(no_auth=True, host="127.0.0.1") is None
    with pytest.raises(SAMSegmentError, match="anyone on the network"):
        resolve_token(no_auth=True, host="0.0.0.0")
    assert len(resolve_token(host="0.0.0.0")) >= 32  # a token is made when none is given


@pytest.mark.slow
def test_overload_is_429_with_retry_after(backend, phantom_volume):
    import threading

    volume, truth = phantom_volume
    index, box = anchor_box(truth)
    state = ServerState(Limits(max_inflight_predictions=1), backends=(backend,))
    with ServerHandle(state, TOKEN) as handle:
        client = RemoteSession(handle.url, TOKEN)
        client.set_volume(volume)
        body = {"axis": 0, "index": index, "prompts": {"points": [], "labels": [], "box": box}, "refine": False}
        url = f"{handle.url}/v1/sessions/{client.session_id}/predict"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        statuses: list[tuple[int, str | None]] = []

        def hit(i: int) -> None:
            body_i = dict(body, index=index - 4 + i)  # uncached slices: each holds the slot for an encode
            r = http("POST", url, json=body_i, headers=headers)
            statuses.append((r.status, r.headers.get("retry-after")))

        threads = [threading.Thread(target=hit, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(code for code, _ in statuses)
        assert 200 in codes and 429 in codes, statuses
        assert all(retry is not None for code, retry in statuses if code == 429)
        with pytest.raises(ServerOverloaded):
            slot = state._predictions
            slot.acquire()
            try:
                client.predict(SliceRef(0, index), Prompts(box=np.array(box)))
            finally:
                slot.release()
        client.close()


def test_wire_round_trips():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.5
    assert np.array_equal(mask_from_json(json.loads(json.dumps(mask_to_json(mask)))), mask)
    volume = rng.integers(-1000, 1000, (3, 5, 7)).astype(np.int16)
    receiver = VolumeReceiver()
    payload = array_to_npy(volume)
    for start in range(0, len(payload), 17):  # any chunking
        receiver.feed(payload[start:start + 17])
    received, content = receiver.finish()
    assert np.array_equal(received, volume) and content == volume_id(volume)
    assert volume_id(volume) == volume_id(volume.copy()) != volume_id(volume.astype(np.int32))


def test_client_needs_neither_torch_nor_the_server_stack():
    import subprocess
    import sys

    code = ("import sys, SAMSegmentLib.client\n"
            "print(sorted(m for m in ('torch', 'cv2', 'fastapi', 'uvicorn', 'SimpleITK', 'requests')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_propagate_on_a_server_writes_the_same_mask_and_png(server, tmp_path, capsys, monkeypatch):
    import SimpleITK as sitk

    from SAMSegmentLib import sample_data
    from SAMSegmentLib.cli import main

    image = str(sample_data.path(sample_data.IMAGE))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.path(sample_data.LABELS))))
    spleen = labels == sample_data.label_values()["spleen"]
    k = int(spleen.sum(axis=(1, 2)).argmax())
    ys, xs = np.nonzero(spleen[k])
    common = ["propagate", image, "--slice", str(k), "--box", *map(str, (xs.min(), ys.min(), xs.max(), ys.max())),
              "--max-slices", "3"]
    assert main(common + ["--out", str(tmp_path / "local.nii.gz"), "--png", str(tmp_path / "local.png")]) == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    remote = ["--server", server.url, "--token-file", str(token_file)]
    out = ["--out", str(tmp_path / "remote.nii.gz"), "--png", str(tmp_path / "remote.png")]
    assert main(common + remote + out) == 0
    local, far = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f))) for f in ("local.nii.gz", "remote.nii.gz"))
    assert local.any() and np.array_equal(local, far)
    assert (tmp_path / "local.png").read_bytes() == (tmp_path / "remote.png").read_bytes()
    capsys.readouterr()
    assert main(common + remote + ["--device", "cpu", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "--device cannot be used with --server" in capsys.readouterr().err
    monkeypatch.delenv("SAMSEGMENT_TOKEN", raising=False)
    assert main(common + ["--server", server.url, "--out", str(tmp_path / "y.nii.gz")]) == 2
    assert "token" in capsys.readouterr().err.lower() and not (tmp_path / "y.nii.gz").exists()


@pytest.mark.slow
def test_samsegment_serve_command_starts_and_stops(tmp_path):
    """The real command line: free port written to --port-file, token from --token-file, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    token_file, port_file = tmp_path / "token", tmp_path / "port"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "SAMSegmentLib.cli", "serve", "--port", "0", "--port-file",
                             str(port_file), "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # Ctrl-C as in a terminal, even when the tests run in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert port_file.exists(), proc.stdout.read() if proc.poll() is not None else "no port file"
        url = f"http://127.0.0.1:{port_file.read_text()}"
        info = http("GET", f"{url}/v1/info").json()
        assert info["api_version"] == 1 and info["auth"] and "litemedsam" in info["models"]
        assert http("POST", f"{url}/v1/sessions", json={}).status == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode in (0, -signal.SIGINT), out
    assert "token required" in out and TOKEN not in out
    refused = subprocess.run([sys.executable, "-m", "SAMSegmentLib.cli", "serve", "--host", "0.0.0.0", "--no-auth"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert refused.returncode == 2 and "anyone on the network" in refused.stderr


def test_a_user_checkpoint_is_checked_before_serving_and_loaded_from_its_file(tmp_path, capsys):
    """``samsegment serve --model M --checkpoint FILE`` (what the Slicer module passes its local
    server for SAM/MedSAM): a missing file stops the command before it listens; a given file is the
    one the server loads the model from."""
    from SAMSegmentLib.cli import main
    from SAMSegmentLib.errors import CheckpointError

    missing = tmp_path / "sam_vit_b_01ec64.pth"
    assert main(["serve", "--model", "sam_vit_b", "--checkpoint", str(missing), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(CheckpointError, match="junk.pth"):
        ServerState(checkpoints={"sam_vit_b": str(junk)}).backend("sam_vit_b")
