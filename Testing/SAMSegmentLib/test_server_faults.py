"""A server killed in the middle of a propagation: the client reports it with the slices it already
has, and after a restart it continues (re-sending the volume, the session and the job the server
lost) with the same final masks as a run that was never interrupted.

The server is a real ``samsegment serve`` process on 127.0.0.1 (kill -9 cannot be simulated in a
thread); the reference run is the engine in-process.
"""

from __future__ import annotations


import numpy as np
import pytest

pytest.importorskip("fastapi")

from phantoms import box_of, ellipsoid_ct  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from SAMSegmentLib.client import PropagationInterrupted, RemoteSession  # noqa: E402
from SAMSegmentLib.propagation import propagate  # noqa: E402
from SAMSegmentLib.prompts import Prompts  # noqa: E402
from SAMSegmentLib.session import SegmentationSession  # noqa: E402
from SAMSegmentLib.volume import SliceRef  # noqa: E402

pytestmark = pytest.mark.slow  # two server processes that each load the model


def test_server_killed_mid_propagation_then_resumed_gives_the_same_masks(tmp_path, eager_backend):
    volume, truth = ellipsoid_ct(shape=(24, 96, 112), drift=0.6)
    index = int(truth.sum(axis=(1, 2)).argmax())
    box = np.asarray(box_of(truth[index]), dtype=float)
    with SegmentationSession(model=eager_backend) as local:  # the reference: the engine in-process
        local.set_volume(volume)
        anchor = local.predict(SliceRef(0, index), Prompts(box=box)).mask
        reference = propagate(local, 0, {index: anchor}, "both")
    assert len(reference.masks) >= 8

    server = ServerProcess(tmp_path, runtime="eager").start()
    try:
        client = RemoteSession(server.url, server.token, timeout=60)
        client.set_volume(volume)
        seen: list[int] = []

        def kill_after_three(ref, mask, outcome):
            seen.append(ref.index)
            if len(seen) == 3:
                server.kill()

        with pytest.raises(PropagationInterrupted, match="3 slices were received and are kept") as interrupted:
            client.propagate(0, {index: anchor}, "both", on_slice=kill_after_three)
        partial = interrupted.value.partial
        assert sorted(partial.masks) == sorted(seen)
        for i in seen:  # what arrived before the kill is the engine's own answer
            assert np.array_equal(partial.masks[i], reference.masks[i])

        server.start()  # restarted (a new port: the client is pointed at it)
        client.retarget(server.url, server.token)
        later: list[int] = []
        result = client.propagate(0, {index: anchor}, "both", resume=partial,
                                  on_slice=lambda ref, mask, outcome: later.append(ref.index))
        assert not set(later) & set(seen)  # slices already delivered are not delivered again
        assert sorted(result.masks) == sorted(reference.masks)
        for i, mask in reference.masks.items():
            assert np.array_equal(result.masks[i], mask), i
        assert [(s.anchor, s.direction, s.reason) for s in result.stops] == \
            [(s.anchor, s.direction, s.reason) for s in reference.stops]
    finally:
        server.stop()
