"""Every manifest kustomization.yaml applies is valid against the Kubernetes API's own schemas, offline.

kubernetes-validate carries the OpenAPI schemas of each Kubernetes release; strict mode also
refuses fields the API does not have (a misspelt key would otherwise be dropped silently by
the API server, e.g. a securityContext setting that never applies). Checked against 1.30, the
first release with securityContext.appArmorProfile, and the newest release the package knows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def kustomized() -> list[tuple[str, dict]]:
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [(f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for name in resources for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("where,doc", kustomized(), ids=[where for where, _ in kustomized()])
def test_manifest_is_valid(where: str, doc: dict, version: str):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} is not a valid {doc['kind']} in Kubernetes {version}: {exc.message} at "
                    f"{'.'.join(map(str, exc.path))}")


def test_the_validator_refuses_what_the_api_would_drop_or_reject():
    (daemonset,) = [doc for _, doc in kustomized() if doc["kind"] == "DaemonSet"]
    misspelt = copy.deepcopy(daemonset)
    misspelt["spec"]["template"]["spec"]["hostPid"] = misspelt["spec"]["template"]["spec"].pop("hostPID")
    wrong_type = copy.deepcopy(daemonset)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "root"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
