"""${sdd.options:<group>}: tiny_matrix sweeps every defense and every attack found in conf/, a new option
joins it without an edit, and a sweep given on the command line still wins."""

from __future__ import annotations

import shutil

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sdd import conf_options


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def planned_jobs(*command_line: str) -> list[dict[str, str]]:
    """The jobs ``python pipeline.py -m experiment=tiny_matrix <command_line>`` launches, as Hydra's
    basic sweeper plans them: its params resolved as Hydra instantiates the sweeper, then the command
    line's sweeps after them."""
    overrides = ["experiment=tiny_matrix", *command_line]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=overrides[:1], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
    # Hydra builds its sweeper from this node with interpolations resolved (instantiate).
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [dict(item.split("=", 1) for item in job) for job in batch]


def test_tiny_matrix_sweeps_every_defense_and_every_attack():
    jobs = planned_jobs()
    pairs = {(job["point.defense"], job["point.attack"]) for job in jobs}
    defenses, attacks = ["none", *options("defense")], ["none", *options("attack")]
    assert len(defenses) >= 12 and len(attacks) >= 7  # 11 defenses and 6 attacks when this was written
    assert len(jobs) == len(pairs) == len(defenses) * len(attacks)
    assert pairs == {(d, a) for d in defenses for a in attacks}


def test_a_sweep_on_the_command_line_replaces_the_discovered_one():
    jobs = planned_jobs("point.defense=none,sdd")
    assert {job["point.defense"] for job in jobs} == {"none", "sdd"}
    assert {job["point.attack"] for job in jobs} == {"none", *options("attack")}
    assert len(planned_jobs("point.defense=sdd", "point.attack=none,mft_advbench")) == 2


def test_the_resolved_sweep_params_list_the_extras_first_then_the_options(monkeypatch, tmp_path):
    params = conf_options.sweep_params("tiny_matrix")
    assert params["point.defense"] == ",".join(["none", *options("defense")])
    assert params["point.attack"] == ",".join(["none", *options("attack")])
    assert conf_options.options_value("defense", "none", "sdd").split(",")[:3] == ["none", "sdd", "booster"]
    assert conf_options.sweep_params("quick_tiny") == {}  # a training experiment sweeps nothing


def test_a_new_attack_of_any_kind_joins_the_matrix_without_an_edit(monkeypatch, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "attack" / "zz_new_attack.yaml").write_text("# @package _global_\nattack_kind: evaluation\n")
    monkeypatch.setattr(conf_options, "CONF_DIR", conf)
    attacks = conf_options.sweep_params("tiny_matrix")["point.attack"].split(",")
    assert attacks == ["none", *options("attack"), "zz_new_attack"]


def test_a_misspelt_group_names_the_groups_there_are():
    with pytest.raises(ValueError, match=r"conf/defence/ holds no option\. Fix the group name: one of .*defense"):
        conf_options.options_value("defence", "none")
