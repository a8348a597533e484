"""The [[models]] configuration and the catalog: names, versions, the default, the canary route,
promotion, unknown models."""
from types import SimpleNamespace

import pytest

from inferd.daemon.config import ConfigError, from_dict
from inferd.daemon.models.catalog import Catalog, UnknownModel


def model(name: str, digest: str = "d", shape=(16, 16, 3), form: str = "float_nchw"):
    spec = SimpleNamespace(name=name, frame_shape=shape, frame_bytes=shape[0] * shape[1] * 3,
                           input_form=form, preprocess_id=f"p{shape[0]}")
    return SimpleNamespace(spec=spec, digest=digest, gen=1, describe=lambda: {"name": name})


def entry(**keys):
    cfg = from_dict({"models": [{"builtin": "synthetic", **keys}]}).models[0]
    return cfg


def catalog_of(*entries):
    return Catalog.of([(e, model(e.name or e.builtin, shape=getattr(e, "_shape", (16, 16, 3)))) for e in entries])


# configuration ------------------------------------------------------------------------------------
def test_models_entries_take_model_keys_and_their_own():
    cfg = from_dict({"models": [{"builtin": "shapes", "default": True, "top_k": 3},
                                {"builtin": "synthetic", "name": "synth", "version": 2, "share": 3,
                                 "devices": [0]}]})
    assert [m.builtin for m in cfg.models] == ["shapes", "synthetic"]
    assert cfg.models[0].default and cfg.models[0].top_k == 3
    assert (cfg.models[1].version, cfg.models[1].share, cfg.models[1].devices) == (2, 3.0, [0])
    assert cfg.model_entries() == cfg.models
    assert from_dict({}).model_entries() == [from_dict({}).model]


@pytest.mark.parametrize("models, message", [
    ([{"builtin": "shapes", "default": True}, {"builtin": "noop", "default": True}], r"models\[1\]\.default"),
    ([{"builtin": "shapes"}, {"builtin": "shapes"}], r"models\[1\]: shapes version 1 is models\[0\]"),
    ([{"builtin": "shapes", "name": "default"}], r"models\[0\]\.name"),
    ([{"builtin": "shapes", "name": "a b"}], r"models\[0\]\.name"),
    ([{"builtin": "shapes", "devices": [-1]}], r"models\[0\]\.devices"),
    ([{"builtin": "shapes", "share": 0}], r"models\[0\]\.share"),
    ([{"builtin": "shapes", "canary_percent": 101}], r"models\[0\]\.canary_percent"),
    ([{"builtin": "shapes", "bogus": 1}], r"models\[0\]\.bogus: unknown key"),
    ([{"path": "/nonexistent.pt2"}], r"models\[0\]\.path: /nonexistent.pt2 does not exist"),
])
def test_bad_models_entries_are_named(models, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"models": models})


# the catalog --------------------------------------------------------------------------------------
def test_resolve_by_name_version_and_default():
    cat = catalog_of(entry(name="a"), entry(name="b", default=True), entry(name="b", version=2))
    assert cat.resolve(None, None, 1000, 1).name == "b"
    assert cat.resolve("default", None, 1000, 1).name == "b"
    assert cat.resolve("b", None, 1000, 1).version == 2         # the newest takes all without a split
    assert cat.resolve("b", 1, 1000, 1).version == 1            # a version named is that version
    assert cat.resolve("a", None, 1000, 1).mid == 0
    assert [s.mid for s in cat.by_id] == [0, 1, 2]
    with pytest.raises(UnknownModel, match=r"'c'.*a \(versions 1\), b \(versions 1, 2\)"):
        cat.resolve("c", None, 1000, 1)
    with pytest.raises(UnknownModel, match="no version 3"):
        cat.resolve("b", 3, 1000, 1)
    with pytest.raises(UnknownModel):
        cat.resolve(["b"], None, 1000, 1)


def test_the_first_entry_is_the_default_when_none_is_marked():
    cat = catalog_of(entry(name="x"), entry(name="y"))
    assert cat.default.name == "x" and cat.default_served.mid == 0 and not cat.single


def test_canary_percent_splits_by_request_id_deterministically():
    cat = catalog_of(entry(name="m"), entry(name="m", version=2, canary_percent=20))
    route = cat.routes["m"]
    assert route.stable.version == 1 and route.canary.version == 2
    picks = [cat.resolve("m", None, 1000, rid).version for rid in range(1, 5001)]
    assert abs(picks.count(2) / len(picks) - 0.20) < 0.02
    assert picks == [cat.resolve("m", None, 1000, rid).version for rid in range(1, 5001)]   # per id


def test_canary_uids_get_the_new_version():
    cat = catalog_of(entry(name="m"), entry(name="m", version=2, canary_uids=[1001]))
    assert {cat.resolve("m", None, 1001, rid).version for rid in range(100)} == {2}
    assert {cat.resolve("m", None, 1000, rid).version for rid in range(100)} == {1}


def test_promotion_moves_every_unnamed_request_to_the_version():
    cat = catalog_of(entry(name="m"), entry(name="m", version=2, canary_percent=10))
    assert cat.promote("m").version == 2
    assert {cat.resolve("m", None, 1000, rid).version for rid in range(1000)} == {2}
    assert cat.resolve("m", 1, 1000, 1).version == 1           # still served when named
    assert cat.promote("m", 1).version == 1                    # and back
    with pytest.raises(UnknownModel, match="no canary"):
        cat.promote("m")
    with pytest.raises(UnknownModel):
        cat.promote("m", 9)


def test_versions_of_one_name_must_take_the_same_frames():
    a, b = entry(name="m"), entry(name="m", version=2)
    with pytest.raises(ConfigError, match="versions take different inputs"):
        Catalog.of([(a, model("m", shape=(16, 16, 3))), (b, model("m", shape=(32, 32, 3)))])


def test_devices_that_do_not_exist_are_named():
    cat = catalog_of(entry(name="a", devices=[0, 3]))
    with pytest.raises(ConfigError, match=r"model a version 1: devices \[3\] do not exist"):
        cat.check_devices(2)
    assert cat.by_id[0].runs_on(0) and not cat.by_id[0].runs_on(1)


def test_largest_frame_and_one_model_catalog():
    cat = Catalog.of([(entry(name="s"), model("s", shape=(16, 16, 3))), (entry(name="l"), model("l", shape=(64, 64, 3)))])
    assert cat.largest_frame() == 64 * 64 * 3
    one = Catalog.of([(None, model("shapes"))])
    assert one.single and one.resolve(None, None, 0, 1) is one.by_id[0] and one.default.name == "shapes"


def test_a_reload_keeps_a_models_entry_its_place():
    """model_config (daemon/ops/reload.py) of a [[models]] entry: a new source or keys, but its
    name, version, devices, share and route keys stay, so the swap keeps its place in the catalog."""
    from inferd.daemon.config import ModelEntryConfig
    from inferd.daemon.ops.reload import model_config

    cfg = from_dict({"models": [{"builtin": "shapes", "name": "s", "version": 3, "share": 2.0, "devices": [0],
                                 "canary_percent": 5}]}).models[0]
    new = model_config(cfg, "noop", settings={"top_k": 2})
    assert isinstance(new, ModelEntryConfig)
    assert (new.builtin, new.top_k, new.name, new.version, new.share, new.devices, new.canary_percent) == \
        ("noop", 2, "s", 3, 2.0, [0], 5.0)
    assert model_config(cfg) is cfg


def test_store_digest_keeps_precisions_and_versions_apart():
    """The embedding store's file keeps 16 characters of what store_digest gives: a plain digest
    keeps its old name, while a precision tag or a [[models]] name and version get files of their
    own (a bf16 run must not read the fp32 run's embeddings)."""
    from inferd.daemon.models.catalog import store_digest
    plain = "ab" * 16
    assert store_digest(plain) == plain
    names = {store_digest(d)[:16] for d in (plain, plain + "+bf16", plain + "+fp16",
                                            plain + "-a.v1", plain + "-a.v2", plain + "+bf16-a.v1")}
    assert len(names) == 6
