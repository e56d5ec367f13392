"""Settings: profile defaults, user YAML, environment overrides and clear errors."""

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_settings, with_overrides


def test_local_profile_puts_all_state_under_home(tmp_path: Path) -> None:
    s = load_settings({"MLOPS_HOME": str(tmp_path)})
    assert s.profile == "local"
    assert s.store.root == f"file://{tmp_path}/lake"
    assert s.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert s.serving.base_dir == f"{tmp_path}/serving"
    assert s.train.launcher == "local"


def test_environment_overrides_yaml_and_are_typed(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  epochs: 9\n  nodes: 3\n")
    s = load_settings(
        {
            "MLOPS_HOME": str(tmp_path),
            "MLOPS_CONFIG": str(user),
            "MLOPS__TRAIN__NODES": "4",
            "MLOPS__CANARY__STEPS": "[10, 100]",
        }
    )
    assert s.train.epochs == 9  # from the user file
    assert s.train.nodes == 4  # environment wins over the file
    assert s.canary.steps == (10, 100)


def test_kubernetes_profile_uses_s3_and_pods(tmp_path: Path) -> None:
    s = load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"})
    assert s.store.root.startswith("s3://")
    assert s.store.sse == "aws:kms"
    assert s.train.launcher == "kubernetes"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MLOPS__STORE__SECRET": "replace-me"}, "store.secret (MLOPS__STORE__SECRET)"),
        ({"MLOPS__MLFLOW__TOKEN": "Change-Me"}, "mlflow.token (MLOPS__MLFLOW__TOKEN)"),
        ({"AWS_SECRET_ACCESS_KEY": "minioadmin"}, "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_a_non_local_profile_refuses_example_secrets(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    base = {"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "kubernetes"}
    with pytest.raises(ConfigError) as err:
        load_settings({**base, **env})
    msg = str(err.value)
    assert msg == (
        f"Profile 'kubernetes' refuses to start: secret {named} is still an example value; "
        "set it from a Kubernetes secret or an Airflow connection."
    )
    assert next(iter(env.values())) not in msg  # the value itself is never echoed
    # The same values are fine on a laptop, and real-looking secrets anywhere.
    load_settings({**env, "MLOPS_HOME": str(tmp_path)})
    load_settings({**base, **{k: "9f2c41d07be3a6" for k in env}})


def test_unknown_profile_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown profile 'prod'"):
        load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS_PROFILE": "prod"})


def test_invalid_value_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nodes"):
        load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS__TRAIN__NODES": "0"})


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epoch"):
        load_settings({"MLOPS_HOME": str(tmp_path), "MLOPS__TRAIN__EPOCH": "3"})


def test_run_overrides_validate(tmp_path: Path) -> None:
    s = load_settings({"MLOPS_HOME": str(tmp_path)})
    assert with_overrides(s, train={"epochs": 2}).train.epochs == 2
    with pytest.raises(ConfigError):
        with_overrides(s, train={"epochs": -1})
