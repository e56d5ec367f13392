"""Write the Envoy bootstrap the project's code renders into base/envoy.yaml, in place.

The ConfigMap ``mlops-envoy-bootstrap`` holds the output of
``pipelines.serving.dataplane.envoy.kubernetes_bootstrap_yaml`` for the settings Airflow's task
pods see (the kubernetes profile plus the Helm values' ``MLOPS_*`` env), so the Envoy Deployment
and the rollout controller agree on clusters, runtime keys and log format.
tests/infra/test_manifests.py fails when the two drift apart. From the repository root:

    .venv/bin/python infra/k8s/render_envoy_bootstrap.py          # rewrite the ConfigMap
    .venv/bin/python infra/k8s/render_envoy_bootstrap.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ENVOY_YAML = HERE / "base" / "envoy.yaml"
HELM_VALUES = HERE.parent / "helm" / "airflow-values.yaml"
BLOCK = "  envoy.yaml: |\n"  # the ConfigMap key; its literal block runs to the next document


def rendered() -> str:
    from pipelines.config import load_settings
    from pipelines.serving.dataplane.envoy import kubernetes_bootstrap_yaml

    env = {e["name"]: e["value"] for e in yaml.safe_load(HELM_VALUES.read_text())["env"]}
    with tempfile.TemporaryDirectory() as home:
        return kubernetes_bootstrap_yaml(load_settings({**env, "MLOPS_HOME": home}))


def with_bootstrap(text: str, bootstrap: str) -> str:
    assert bootstrap.endswith("\n") and not bootstrap.endswith("\n\n"), "clip chomping"
    start = text.index(BLOCK) + len(BLOCK)
    end = text.index("\n---\n", start) + 1
    return text[:start] + textwrap.indent(bootstrap, "    ", lambda _: True) + text[end:]


def main(argv: list[str]) -> int:
    text = ENVOY_YAML.read_text()
    new = with_bootstrap(text, rendered())
    if "--check" in argv:
        if new != text:
            print(f"{ENVOY_YAML} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    ENVOY_YAML.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
