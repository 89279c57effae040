"""The offline Kubernetes manifest validator (tests/k8s_schema.py) can both pass and fail."""

from __future__ import annotations

import copy
from typing import Any

import k8s_schema
import pytest
from celpy import celtypes
from k8s_schema import load_yaml_documents, validate, validate_all

JOB_AND_SERVICE = """
apiVersion: batch/v1
kind: Job
metadata:
  name: train
  creationTimestamp: 2024-01-01T00:00:00Z
spec:
  completionMode: Indexed
  completions: 2
  parallelism: 2
  backoffLimit: 0
  template:
    spec:
      subdomain: train
      restartPolicy: Never
      containers:
        - name: trainer
          image: busybox:1.36
          command: ["python", "train.py"]
          resources:
            limits: {cpu: "1", memory: 1Gi}
---
apiVersion: v1
kind: Service
metadata:
  name: train
spec:
  clusterIP: None
  selector:
    job-name: train
  ports:
    - name: rdzv
      port: 29500
"""


def _pod(container: str) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": container, "image": "trainer:latest"}]}}


def _pytorchjob() -> dict[str, Any]:
    spec = {"replicas": 1, "restartPolicy": "OnFailure", "template": _pod("pytorch")}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "ddp"},
        "spec": {"pytorchReplicaSpecs": {"Master": spec, "Worker": copy.deepcopy(spec)}},
    }


def _jobset() -> dict[str, Any]:
    job_spec = {
        "completionMode": "Indexed",
        "completions": 2,
        "parallelism": 2,
        "backoffLimit": 0,
        "template": {"spec": {"restartPolicy": "Never", **_pod("trainer")["spec"]}},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "train"},
        "spec": {"replicatedJobs": [{"name": "workers", "template": {"spec": job_spec}}]},
    }


def _job() -> dict[str, Any]:
    return load_yaml_documents(JOB_AND_SERVICE)[0]


def test_builtin_job_and_headless_service_pass() -> None:
    docs = load_yaml_documents(JOB_AND_SERVICE)
    assert [d["kind"] for d in docs] == ["Job", "Service"]
    assert docs[0]["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    assert validate_all(docs) == []
    assert validate(docs[1], k8s_version="1.99") == []  # newest schema <= 1.99


def test_job_unknown_container_field_fails_with_path() -> None:
    job = _job()
    job["spec"]["template"]["spec"]["containers"][0]["foo"] = 1
    assert validate(job) == ["spec.template.spec.containers[0].foo: unknown field"]


def test_job_wrong_type_fails() -> None:
    job = _job()
    job["spec"]["parallelism"] = "two"
    errors = validate_all([job])
    assert len(errors) == 1
    assert errors[0].startswith("Job/train: spec.parallelism: 'two' is not of type 'integer'")


def test_all_errors_are_reported() -> None:
    job = _job()
    job["spec"]["parallelism"] = "two"
    job["spec"]["template"]["spec"]["containers"][0]["foo"] = 1
    job["spec"]["template"]["spec"]["containers"][0]["bar"] = 2
    assert len(validate(job)) == 3


def test_pytorchjob_passes() -> None:
    assert validate(_pytorchjob()) == []


def test_pytorchjob_unknown_field_fails() -> None:
    job = _pytorchjob()
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    worker["template"]["spec"]["containers"][0]["foo"] = 1
    job["spec"]["bogus"] = True
    assert validate(job) == [
        "spec.bogus: unknown field",
        "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].foo: unknown field",
    ]


def test_custom_resource_metadata_requires_name() -> None:
    job = _pytorchjob()
    del job["metadata"]["name"]
    assert validate(job) == ["metadata: 'name' is a required property"]


def test_jobset_passes() -> None:
    assert validate(_jobset()) == []


def test_jobset_cel_rule_violation_fails_with_message() -> None:
    jobset = _jobset()
    workers = jobset["spec"]["replicatedJobs"][0]
    launcher = {**copy.deepcopy(workers), "name": "launcher"}
    workers["dependsOn"] = [{"name": "launcher", "status": "Ready"}]
    jobset["spec"]["replicatedJobs"].insert(0, launcher)
    assert validate(jobset) == []  # dependsOn alone is fine
    jobset["spec"]["startupPolicy"] = {"startupPolicyOrder": "InOrder"}
    (error,) = validate(jobset)
    assert error.startswith("spec: StartupPolicy and DependsOn APIs are mutually exclusive")


def test_jobset_nested_cel_rule_in_list_items() -> None:
    jobset = _jobset()
    template = {"metadata": {"name": "data", "namespace": "other"}, "spec": {}}
    jobset["spec"]["volumeClaimPolicies"] = [{"templates": [template]}]
    (error,) = validate(jobset)
    assert error.startswith(
        "spec.volumeClaimPolicies[0]: namespace cannot be set for VolumeClaimPolicies templates"
    )
    del template["metadata"]["namespace"]
    assert validate(jobset) == []


def test_jobset_duplicate_list_map_key_fails() -> None:
    jobset = _jobset()
    jobs = jobset["spec"]["replicatedJobs"]
    jobs.append(copy.deepcopy(jobs[0]))
    assert validate(jobset) == [
        'spec.replicatedJobs[1]: duplicate entry in list-type=map: ["workers"]'
    ]


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
        {"apiVersion": "batch.example.com/v1", "kind": "Job", "metadata": {"name": "w"}},
        {"apiVersion": "kubeflow.org/v2", "kind": "PyTorchJob", "metadata": {"name": "w"}},
        {"kind": "Job", "metadata": {"name": "w"}},
    ],
)
def test_unknown_kind_fails(doc: dict[str, Any]) -> None:
    (error,) = validate(doc)
    assert error.startswith("<root>: ")


def test_validate_all_prefixes_kind_and_name() -> None:
    job = _pytorchjob()
    job["spec"]["bogus"] = 1
    assert validate_all([_jobset(), job]) == ["PyTorchJob/ddp: spec.bogus: unknown field"]


def test_cel_rules_counted_and_all_supported() -> None:
    assert k8s_schema.unsupported_rules() == []
    summary = k8s_schema.cel_rule_summary()
    assert summary["JobSet"] == {
        "total": 8,
        "transition_skipped": 6,
        "evaluated": 2,
        "unsupported": 0,
    }
    assert summary["PyTorchJob"]["total"] == summary["PyTorchJob"]["transition_skipped"] == 1


def test_unsupported_cel_function_is_an_error_not_a_pass() -> None:
    rule = k8s_schema.CelRule(kind="X", path="spec", rule="quantity(self).isLessThan(1)")
    error = k8s_schema._evaluate_rule(rule, "1Gi", ["spec"])
    assert error is not None and "CEL rule not supported" in error and "quantity" in error


def test_to_cel_types() -> None:
    value = k8s_schema.to_cel({"b": True, "i": 1, "f": 0.5, "s": "x", "n": None, "l": [1]})
    assert isinstance(value[celtypes.StringType("b")], celtypes.BoolType)
    assert isinstance(value[celtypes.StringType("i")], celtypes.IntType)
    assert isinstance(value[celtypes.StringType("f")], celtypes.DoubleType)
    assert value[celtypes.StringType("n")] is None
    assert isinstance(value[celtypes.StringType("l")], celtypes.ListType)
