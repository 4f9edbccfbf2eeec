"""Any value for any config key either loads or is refused with one `LdmError` line that
names a key: never another exception, never a traceback (hypothesis searches for one)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import LdmError
from core.loader import build_config


def _keys() -> list[tuple[str, str]]:
    tree = build_config({"preset": "tiny"}, absolute_paths=False).to_dict()
    return [(section, key) for section, fields in tree.items() for key in fields]


KEYS = _keys()
ALL_KEYS = {f"{s}.{k}" for s, k in KEYS}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, 3, -1, 4096]),  # the edges: zero, one, negative, large
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,  # the same examples on every run: the suite stays deterministic
    suppress_health_check=[HealthCheck.too_slow],
)
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_loads_or_is_refused_naming_a_key(key, value):
    section, name = key
    try:
        config = build_config({"preset": "tiny", section: {name: value}}, absolute_paths=False)
    except LdmError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith("config key "), message
        named = message.removeprefix("config key ").split(":", 1)[0]
        assert named.split(".")[0] in {s for s, _ in KEYS} and (
            ".".join(named.split(".")[:2]) in ALL_KEYS
        ), message
        return
    loaded = getattr(getattr(config, section), name)
    if isinstance(loaded, float):
        assert math.isfinite(loaded), f"{section}.{name}={loaded} was accepted"
    # YAML reads a bare `off` as false: `data.buckets: off` is what the user meant.
    yaml_off = (section, name, value, loaded) == ("data", "buckets", False, "off")
    if isinstance(value, bool) and not yaml_off:  # a bool is only ever a bool
        assert isinstance(loaded, bool) or loaded is None, f"{section}.{name}={loaded!r}"


@pytest.mark.parametrize(
    "override",
    ["train.num_steps=true", "train.num_steps=2.0", "train.learning_rate=.inf"],
)
def test_no_silent_coercion(override):
    with pytest.raises(LdmError, match=override.split("=")[0]):
        build_config({"preset": "tiny"}, [override])
