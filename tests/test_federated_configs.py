"""Every federated server's settings are a validated dataclass: constructors keep their keywords,
``config()`` is the dataclass as JSON, and bad values fail with the setting's name."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

import lifelong.federated as fl
from lifelong.federated.afa_cd import AFACDConfig
from lifelong.federated.afa_cs import AFACSConfig, MemoryConfig
from lifelong.federated.fedavg import FedAvgConfig
from lifelong.federated.fedbuff import FedBuffConfig
from lifelong.federated.mifa import MIFAConfig
from lifelong.federated.server import ServerConfig

SERVERS = [(fl.AFACD, AFACDConfig), (fl.AFACS, AFACSConfig), (fl.FedAvg, FedAvgConfig),
           (fl.FedBuff, FedBuffConfig), (fl.MIFA, MIFAConfig)]


@pytest.mark.parametrize("server_cls, config_cls", SERVERS)
def test_each_server_has_a_dataclass_config_with_the_constructor_defaults(server_cls, config_cls):
    assert server_cls.Config is config_cls and issubclass(config_cls, ServerConfig)
    assert dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen
    server = server_cls()
    assert isinstance(server.settings, config_cls)
    defaults = config_cls()
    for name, param in inspect.signature(server_cls).parameters.items():
        assert param.kind is param.KEYWORD_ONLY, name
        value = getattr(defaults, name)
        if callable(value):   # staleness weights: compare what they compute
            assert value(3) == param.default(3), name
        else:
            assert value == param.default, name
    assert server.config() == {"algorithm": server.name, **server.settings.to_dict()}


def test_config_dicts_are_unchanged_so_checkpoint_fingerprints_still_match():
    assert fl.AFACD(local_lr=0.1, buffer_size=3).config() == {
        "algorithm": "afa_cd", "local_lr": 0.1, "server_lr": 1.0, "max_staleness": 10, "stale_policy": "drop",
        "staleness_weight": None, "buffer_size": 3, "weighting": "uniform", "distinct_per_step": False}
    assert fl.FedBuff().config()["staleness_weight"] == "polynomial(0.5)"
    assert fl.MIFA(min_fraction=0.5).config() == {
        "algorithm": "mifa", "local_lr": 0.05, "server_lr": 1.0, "max_staleness": 0, "stale_policy": "drop",
        "staleness_weight": None, "cs_init": "available_only", "min_new": 1, "resync_every": 100,
        "min_fraction": 0.5}


@pytest.mark.parametrize("build, match", [
    (lambda: fl.AFACS(min_new=0), "min_new"),
    (lambda: fl.AFACS(resync_every=True), "resync_every"),
    (lambda: fl.AFACS(local_lr=float("nan")), "local_lr"),
    (lambda: fl.FedAvg(cohort_size=2.5), "cohort_size"),
    (lambda: fl.FedAvg(weighting="size"), "weighting"),
    (lambda: fl.FedBuff(buffer_size=0), "buffer_size"),
    (lambda: fl.FedBuff(staleness_weight=0.5), "staleness_weight"),
    (lambda: fl.MIFA(min_fraction=1.5), "min_fraction"),
    (lambda: fl.AFACD(max_staleness=1.5), "max_staleness must be None or an integer"),
    (lambda: fl.AFACD(distinct_per_step="yes"), "distinct_per_step"),
    (lambda: FedAvgConfig(max_staleness=3), "synchronous"),
    (lambda: MIFAConfig(min_new=2), "MIFA fixes"),
    (lambda: fl.polynomial_staleness(-1.0), "exponent"),
    (lambda: fl.AFACS(server_lr=0.0), "server_lr"),
    (lambda: fl.AFACS(max_slot_age=-1), "max_slot_age"),
    (lambda: fl.FedAvg(max_update_norm=0.0), "max_update_norm"),
])
def test_bad_settings_fail_with_their_name(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_settings_are_a_frozen_config_validated_once():
    server = fl.AFACD(buffer_size=4)
    assert server.settings.buffer_size == 4 and server.config()["buffer_size"] == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.settings.buffer_size = 2
    assert not hasattr(server, "buffer_size")          # no per-setting attributes or descriptors
    with pytest.raises(ValueError, match="buffer_size"):
        dataclasses.replace(server.settings, buffer_size=0)
    server.init({"x": torch.zeros(3)}, 4)
    for worker in range(4):   # the configured buffer size is what the server uses
        stepped = server.submit(fl.Update(worker, {"x": torch.ones(3)}, 0, 1))
    assert stepped and server.version == 1
    assert server.local_lr == server.settings.local_lr == 0.05


def test_settings_added_later_stay_out_of_the_config_dict_at_their_default():
    assert "max_update_norm" not in fl.AFACD().config()
    assert fl.AFACD(max_update_norm=5.0).config()["max_update_norm"] == 5.0
    assert "max_slot_age" not in fl.MIFA().config() and fl.AFACS(max_slot_age=3).config()["max_slot_age"] == 3


def test_a_server_is_built_from_its_config_object():
    server = fl.AFACS.from_config(AFACSConfig(min_new=3, cs_init="zeros"))
    assert (server.settings.min_new, server.settings.cs_init) == (3, "zeros") and isinstance(server, fl.AFACS)
    with pytest.raises(TypeError, match="AFACSConfig"):
        fl.AFACS.from_config(MemoryConfig())
    with pytest.raises(TypeError, match="AFACDConfig"):
        fl.AFACD.from_config(FedAvgConfig())


@pytest.mark.parametrize("build, match", [
    (lambda: fl.Shards(0), "shards_per_worker"),
    (lambda: fl.ClassesPerWorker(0), "classes"),
    (lambda: fl.Dirichlet(float("inf")), "alpha"),
    (lambda: fl.Bernoulli(0.5, interval=0), "interval"),
    (lambda: fl.MarkovOnOff(1.0, -1.0), "mean_off"),
    (lambda: fl.Periodic(duty=0.0), "duty"),
    (lambda: fl.TimeBudget(5.0, max_steps=0), "max_steps"),
    (lambda: fl.FixedSteps(True), "local steps"),
    (lambda: fl.Speed(bandwidth=0.0), "bandwidth must be None or"),
    (lambda: fl.Faults(prob=2.0), "prob"),
    (lambda: fl.Restarts(jitter=-1.0), "jitter"),
    (lambda: fl.Restarts(order="lifo"), "order"),
])
def test_other_federated_settings_use_the_shared_checks(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_numpy_numbers_are_accepted():
    fl.Speed(step_time=np.float32(0.5), sigma=np.float64(0.1))
    fl.Dirichlet(np.float32(0.3))
