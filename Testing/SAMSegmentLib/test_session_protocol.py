"""The session Protocol says exactly what the algorithms use, and the real session implements it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from SAMSegmentLib.session import SegmentationSession
from SAMSegmentLib.session_protocol import SessionProtocol

ENGINE = Path(__file__).resolve().parents[2] / "SAMSegmentLib"
USERS = ("propagation.py", "automatic.py", "samaug.py", "uncertainty.py")


def protocol_members() -> dict[str, object]:
    members = {name: None for name in SessionProtocol.__annotations__}
    members.update({name: value for name, value in vars(SessionProtocol).items()
                    if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))})
    return members


def test_the_protocol_lists_what_the_algorithms_use_from_a_session():
    used = {name for module in USERS
            for name in re.findall(r"\bsession\.(\w+)", (ENGINE / module).read_text(encoding="utf-8"))}
    members = set(protocol_members())
    assert used == members, f"add to the protocol: {sorted(used - members)}; unused: {sorted(members - used)}"


def test_the_real_session_implements_the_protocol(session, phantom):
    session.set_volume(phantom[0])  # ``shape`` refuses to answer without a volume
    assert isinstance(session, SessionProtocol)
    for name, member in protocol_members().items():
        real = inspect.getattr_static(SegmentationSession, name, None)
        if member is None:  # a data attribute, set in __init__
            assert hasattr(session, name), name
        elif isinstance(member, property):
            assert isinstance(real, property), name
        else:  # every parameter of the protocol's method is accepted, with the same default
            real_params = inspect.signature(real).parameters
            for param in inspect.signature(member).parameters.values():
                assert param.name in real_params, (name, param.name)
                assert real_params[param.name].default == param.default, (name, param.name)
