"""Bad input gets one clear error that names the fix."""

from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from sdd.backbones import Backbone, BackboneError
from sdd.data.sources import DataSource, DataSourceError, load_records

from conftest import compose_config


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(DataSourceError, match=r"file not found.*Fix corpus\.harmful\.path"):
        load_records({"name": "corpus.harmful", "path": str(tmp_path / "nope.jsonl"), "columns": {"instruction": "p"}})


def test_malformed_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    with pytest.raises(DataSourceError, match="could not parse"):
        load_records({"path": str(bad), "columns": {"instruction": "prompt"}})


def test_unknown_file_format(tmp_path):
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataSourceError, match="csv"):
        load_records({"path": str(odd), "columns": {"instruction": "prompt"}})


def test_misnamed_column_lists_the_real_ones(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("question,reply\nq1,a1\n")
    with pytest.raises(DataSourceError) as error:
        load_records({"name": "corpus.refusals", "path": str(path), "columns": {"instruction": "prompt"}})
    message = str(error.value)
    assert "'prompt' not found" in message and "question" in message and "corpus.refusals.columns" in message


def test_filter_that_leaves_nothing(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "is_safe": True}) + "\n")
    with pytest.raises(DataSourceError, match="where"):
        load_records({"path": str(path), "columns": {"instruction": "prompt"}, "where": {"is_safe": False}})


def test_csv_booleans_filter_like_booleans(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,is_safe\na,False\nb,True\n")
    records = load_records({"path": str(path), "columns": {"instruction": "prompt"}, "where": {"is_safe": False}})
    assert records == [{"instruction": "a"}]


def test_nested_columns(tmp_path):
    path = tmp_path / "lima.jsonl"
    path.write_text(json.dumps({"conversations": ["question", "answer"]}) + "\n")
    assert load_records({"path": str(path), "columns": {"answer": "conversations.1"}}) == [{"answer": "answer"}]


def test_unknown_source_key():
    with pytest.raises(DataSourceError, match="Unknown key"):
        DataSource.from_config({"file": "x.csv"})


def test_hub_unreachable_says_which_data_set_and_how_to_pass_a_file():
    # Tests run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1, as on a machine without the Hub.
    with pytest.raises(DataSourceError) as error:
        load_records({"name": "corpus.harmful", "hub_id": "PKU-Alignment/BeaverTails", "split": "30k_train",
                      "columns": {"instruction": "prompt"}})
    message = str(error.value)
    assert "PKU-Alignment/BeaverTails" in message
    assert "corpus.harmful.path=" in message


def test_unknown_backbone_config_lists_options(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        compose_config("train", ["backbone=gpt5"], output_dir=tmp_path)
    assert "smollm2_135m_instruct" in str(error.value)


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException, match="data.batchsize"):
        compose_config("train", ["data.batchsize=3"], output_dir=tmp_path)


def test_backbone_not_found_names_the_fix(tmp_path):
    backbone = Backbone(name="custom", source="pretrained", name_or_path=str(tmp_path / "no-model"))
    with pytest.raises(BackboneError, match="backbone.name_or_path"):
        backbone.load_tokenizer()


def test_unknown_backbone_source():
    with pytest.raises(BackboneError, match="backbone.source"):
        Backbone(name="x", source="ollama")


def test_unmapped_required_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataSourceError, match=r"corpus\.refusals\.columns\.answer="):
        load_records({"name": "corpus.refusals", "path": str(path), "columns": {"instruction": "prompt"}},
                     required=["instruction", "answer"])
