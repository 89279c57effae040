"""Kubernetes: a Kubeflow PyTorchJob, a JobSet, or a plain Indexed Job with a headless Service.

Each pod runs `torchrun` (one process per GPU), so Lightning sees TorchElastic's environment on
every kind; only where the node rank and the rendezvous host come from differs. Pods run as
non-root, share one volume for data, checkpoints and exports, and read MLflow credentials from
a Secret by reference. Restarted pods run the same command with `ckpt_path=last` and resume.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from jobs.evaluation import eval_command, eval_name
from jobs.launcher import DNS_LIMIT, Job, Launcher, SubmitError, dns_name

# Keys of the MLflow Secret, read by MLflow's client from the environment; all optional, so one
# Secret serves basic auth (username/password) and token auth alike.
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
APP_LABEL = {"app.kubernetes.io/name": "ldm-pipeline"}


class KubernetesLauncher(Launcher):
    """Shared pod spec of the three kinds; subclasses wrap it in their objects."""

    container_name = "trainer"
    rank_env = "JOB_COMPLETION_INDEX"  # set by the Job controller on Indexed Jobs

    def __init__(
        self,
        image: str | None = None,
        namespace: str = "default",
        pvc: str = "ldm-shared",
        mount_path: str = "/mnt/shared",
        output_dir: str = "/mnt/shared/outputs",
        node_selector: dict[str, str] | None = None,
        tolerations: list[dict[str, Any]] | None = None,
        mlflow_tracking_uri: str | None = None,
        mlflow_secret: str | None = None,
        secret_env: dict[str, str] | None = None,
        run_as_user: int = 1000,
        max_restarts: int = 3,
        master_port: int = 29500,
        shm_gb: int = 8,
        grace_seconds: int = 120,
        apply: bool = True,
        **resources,
    ) -> None:
        super().__init__(**resources)
        if not image:
            raise SubmitError("launcher.image is not set: give the training image, e.g. "
                              "launcher.image=registry.example.com/ldm-pipeline:0.1")  # fmt: skip
        if mlflow_tracking_uri and "@" in mlflow_tracking_uri.split("//", 1)[-1].split("/")[0]:
            raise SubmitError("launcher.mlflow_tracking_uri holds credentials; put them in the "
                              "Secret named by launcher.mlflow_secret instead")  # fmt: skip
        self.image, self.namespace = image, namespace
        self.pvc, self.mount_path, self.output_dir = pvc, mount_path, output_dir
        self.node_selector, self.tolerations = dict(node_selector or {}), list(tolerations or [])
        self.mlflow_tracking_uri, self.mlflow_secret = mlflow_tracking_uri, mlflow_secret
        self.secret_env = dict(secret_env or {})  # ENV -> "secret" or "secret/key"
        self.run_as_user, self.max_restarts = run_as_user, max_restarts
        self.master_port, self.shm_gb, self.apply = master_port, shm_gb, apply
        # Between the SIGTERM that stops a pod and the SIGKILL: time to finish the step and
        # write its checkpoint (train.callbacks.preemption.CheckpointOnTerminate). Kubernetes'
        # default
        # of 30 s is short for a multi-GB sharded checkpoint.
        self.grace_seconds = grace_seconds

    def names(self, run_name: str, stamp: str) -> tuple[str, str]:
        if self.job_name:
            name = dns_name(self.job_name)
        else:  # the run name is cut, never the stamp: each submission stays a run of its own
            suffix = dns_name(f"x-{stamp}").removeprefix("x-")
            name = f"{dns_name(run_name, DNS_LIMIT - len(suffix) - 1)}-{suffix}"
        return name, name  # the object name is the run name: restarted pods find their run

    def filename(self, job: Job) -> str:
        return f"{job.name}.yaml"

    # -- what differs per kind -------------------------------------------------------------
    def master_addr(self, job: Job) -> str:
        raise NotImplementedError

    def objects(self, job: Job) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- the pod -----------------------------------------------------------------------------
    def command(self, job: Job) -> list[str]:
        """torchrun in each pod; `$(VAR)` is expanded by the kubelet from the pod's env."""
        return [
            "torchrun",
            f"--nnodes={self.nodes}",
            f"--nproc-per-node={self.procs}",
            f"--node-rank=$({self.rank_env})",
            f"--master-addr={self.master_addr(job)}",
            f"--master-port={self.master_port}",
            "--max-restarts=0",  # restarts are the controller's: whole pods, resuming
            "--no-python",
            "ldm-train",
            *self.train_args(job),
        ]

    def env_vars(self, job: Job) -> list[dict[str, Any]]:
        # Lineage: the run's MLflow tags name the pod and job that ran it
        # (train/tracking/lineage.py).
        env: list[dict[str, Any]] = [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "LDM_JOB_NAME", "value": job.name},
        ]  # fmt: skip
        if self.mlflow_tracking_uri:
            env.append({"name": "MLFLOW_TRACKING_URI", "value": self.mlflow_tracking_uri})
        if self.mlflow_secret:
            env += [
                {"name": key, "valueFrom": {"secretKeyRef": {
                    "name": self.mlflow_secret, "key": key, "optional": True}}}
                for key in MLFLOW_SECRET_KEYS
            ]  # fmt: skip
        for name, ref in self.secret_env.items():
            secret, _, key = ref.partition("/")
            ref_spec = {"secretKeyRef": {"name": secret, "key": key or name}}
            env.append({"name": name, "valueFrom": ref_spec})
        return env + [{"name": k, "value": str(v)} for k, v in self.env.items()]

    def container(self, job: Job, command: list[str] | None = None, procs: int | None = None,
                  name: str | None = None) -> dict[str, Any]:  # fmt: skip
        """The training container; `command`, `procs` (GPUs or CPU processes) and `name` for
        another one (the evaluator)."""
        procs = procs or self.procs
        limits: dict[str, Any] = {"cpu": str(self.cpus_per_task * procs),
                                  "memory": f"{self.mem_gb}Gi"}  # fmt: skip
        requests = dict(limits)
        if self.gpus_per_node:
            limits["nvidia.com/gpu"] = min(self.gpus_per_node, procs)
        return {
            "name": name or self.container_name,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command or self.command(job),
            "env": self.env_vars(job),
            "ports": [{"name": "rendezvous", "containerPort": self.master_port}],
            "resources": {"limits": limits, "requests": requests},
            "volumeMounts": [
                {"name": "shared", "mountPath": self.mount_path},
                {"name": "dshm", "mountPath": "/dev/shm"},  # data-loader workers' shared memory
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },  # fmt: skip
        }

    def pod_template(self, job: Job, restart_policy: str, container: dict[str, Any] | None = None,
                     **extra: Any) -> dict[str, Any]:  # fmt: skip
        spec: dict[str, Any] = {
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": self.grace_seconds,
            **extra,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": self.run_as_user,
                "runAsGroup": self.run_as_user,
                "fsGroup": self.run_as_user,
            },
            "containers": [container or self.container(job)],
            "volumes": [
                {"name": "shared", "persistentVolumeClaim": {"claimName": self.pvc}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{self.shm_gb}Gi"}},
            ],
        }
        if self.node_selector:
            spec["nodeSelector"] = self.node_selector
        if self.tolerations:
            spec["tolerations"] = self.tolerations
        return {"metadata": {"labels": self.labels(job)}, "spec": spec}

    def labels(self, job: Job) -> dict[str, str]:
        return {**APP_LABEL, "ldm-pipeline/job": job.name}

    def metadata(self, job: Job) -> dict[str, Any]:
        return {"name": job.name, "namespace": self.namespace, "labels": self.labels(job)}

    # -- rendering and submitting -------------------------------------------------------------
    def render(self, job: Job) -> str:
        job = Job(job.name, job.run_name, job.overrides, self.output_dir)  # paths in the pods
        docs = self.objects(job)
        return "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)

    def render_eval(self, job: Job, eval_args: list[str]) -> str:
        """A batch/v1 Job of one pod running `ldm-eval --watch` on the run's folder on the
        shared volume; restarted pods resume (the watcher skips what it has scored)."""
        job = Job(job.name, job.run_name, job.overrides, self.output_dir)  # paths in the pods
        evaluator = Job(eval_name(job.name), job.run_name, [], job.paths_root)
        command = eval_command(f"{job.paths_root}/runs/{job.run_name}", eval_args)
        container = self.container(evaluator, command, procs=1, name="evaluator")
        del container["ports"]  # no rendezvous
        pod = self.pod_template(evaluator, "OnFailure", container)
        pod["metadata"]["labels"]["ldm-pipeline/evaluates"] = job.name
        doc = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self.metadata(evaluator),
            "spec": {"backoffLimit": self.max_restarts, "template": pod},
        }
        return yaml.safe_dump(doc, sort_keys=False, width=100)

    def submit_eval(self, job: Job, path: Path, submitted: str) -> str:
        return self.submit(job, path)

    def submit(self, job: Job, path: Path) -> str:
        if not self.apply:
            return f"written {path}; apply it with: kubectl apply -f {path}"
        if not shutil.which("kubectl"):
            raise SubmitError(f"kubectl not found; {path} is written: apply it where kubectl "
                              "works, or set launcher.apply=false to only write it")  # fmt: skip
        out = subprocess.run(["kubectl", "apply", "-f", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SubmitError(f"kubectl apply -f {path} failed: {out.stderr.strip()}")
        return out.stdout.strip()


class PyTorchJobLauncher(KubernetesLauncher):
    """Kubeflow training operator (kubeflow.org/v1): it sets MASTER_ADDR, MASTER_PORT and RANK
    (the pod's index: Master 0, Workers 1..) in every replica."""

    container_name = "pytorch"  # the operator finds the training container by this name
    rank_env = "RANK"

    def master_addr(self, job: Job) -> str:
        return "$(MASTER_ADDR)"

    def objects(self, job: Job) -> list[dict[str, Any]]:
        def replicas(n: int) -> dict[str, Any]:
            return {"replicas": n, "restartPolicy": "OnFailure",
                    "template": self.pod_template(job, "OnFailure")}  # fmt: skip

        specs = {"Master": replicas(1)}
        if self.nodes > 1:
            specs["Worker"] = replicas(self.nodes - 1)
        return [{
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": self.metadata(job),
            "spec": {
                "nprocPerNode": str(self.procs),
                "runPolicy": {"backoffLimit": self.max_restarts, "cleanPodPolicy": "None"},
                "pytorchReplicaSpecs": specs,
            },
        }]  # fmt: skip


class JobSetLauncher(KubernetesLauncher):
    """JobSet (jobset.x-k8s.io/v1alpha2): one Indexed Job of `nodes` pods; JobSet's headless
    Service gives pod 0 the name `<jobset>-node-0-0.<jobset>`. A failure recreates all pods
    (up to `max_restarts`), which then resume together."""

    def master_addr(self, job: Job) -> str:
        return f"{job.name}-node-0-0.{job.name}"

    def objects(self, job: Job) -> list[dict[str, Any]]:
        indexed = {
            "parallelism": self.nodes,
            "completions": self.nodes,
            "completionMode": "Indexed",
            "backoffLimit": 0,  # a failed pod fails the Job; JobSet restarts the whole set
            "template": self.pod_template(job, "Never"),
        }
        return [{
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": self.metadata(job),
            "spec": {
                "network": {"enableDNSHostnames": True, "subdomain": job.name},
                "failurePolicy": {"maxRestarts": self.max_restarts},
                "replicatedJobs": [{"name": "node", "replicas": 1,
                                    "template": {"spec": indexed}}],
            },
        }]  # fmt: skip


class IndexedJobLauncher(KubernetesLauncher):
    """Plain batch/v1 Indexed Job + headless Service, for clusters without operators: pod i is
    `<job>-<i>.<job>`, so pod 0 hosts the rendezvous."""

    def master_addr(self, job: Job) -> str:
        return f"{job.name}-0.{job.name}"

    def objects(self, job: Job) -> list[dict[str, Any]]:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(job),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,  # rendezvous before any pod is Ready
                "selector": self.labels(job),
                "ports": [{"name": "rendezvous", "port": self.master_port}],
            },
        }
        pod = self.pod_template(job, "OnFailure", subdomain=job.name)
        batch_job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self.metadata(job),
            "spec": {
                "completionMode": "Indexed",
                "completions": self.nodes,
                "parallelism": self.nodes,
                "backoffLimit": self.max_restarts * self.nodes,
                "template": pod,
            },
        }
        return [service, batch_job]
