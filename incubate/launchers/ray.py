"""The Ray launcher: each job a Ray task running `process.execute` where Ray places it, on one
node (torchrun inside the task when the job has several devices). Ray is an optional extra
(`pip install 'deep-incubate[ray]'`)."""
from __future__ import annotations

import os

from ..errors import UserError
from .base import gpus_a_node
from .job import Job, Resources
from .process import execute


class RayLauncher:
    """One Ray task a job, asking for the recipe's CPUs and GPUs a job; Ray places and queues them."""
    name = "ray"

    def __init__(self, recipe, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--launcher ray needs Ray: pip install 'deep-incubate[ray]'") from None
        self.ray, self.recipe, self.launch = ray, recipe, recipe.launch
        if not ray.is_initialized():
            # address=None starts a local instance unless RAY_ADDRESS names a cluster.
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, runtime_env=job_runtime_env())
            except ConnectionError as e:
                raise UserError(f"cannot reach the Ray cluster at {address}: {e}; start it with "
                                f"`ray start --head` or drop --address for a local instance") from None
        self.task = ray.remote(execute)

    def plan(self, stage: str, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        shape = self.launch.shape(stage)        # nodes > 1 was refused by make_launcher
        procs = max(1, shape.devices_per_node)
        return max(1, min(parallel, n_jobs)), Resources(procs=procs, threads=shape.cpus_per_task or 1,
                                                        gpus=gpus_a_node(self.recipe, shape.devices_per_node))

    def submit(self, job: Job, res: Resources):
        # max_retries=0: retries are the scheduler's, the same for every launcher.
        return self.task.options(num_cpus=res.threads * res.procs, num_gpus=res.gpus, max_retries=0,
                                 name=f"incubate-{job.label.replace(' ', '-')}").remote(job, res)

    def poll(self, ref) -> tuple[int | None, str]:
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return None, ""
        try:
            return self.ray.get(ref), ""
        except self.ray.exceptions.RayError as e:      # the worker or its node died
            return 1, f"Ray task failed: {str(e).splitlines()[0]}"

    def stop(self, ref) -> None:
        self.ray.cancel(ref, force=True)


def job_runtime_env() -> dict:
    """Ray raises its workers' niceness by 15 over its raylet's, below everything else on the node: a
    job runs at the raylet's priority instead (for a local instance, that of `incubate run`), as under
    the other launchers; unless the user sets Ray's own RAY_worker_niceness."""
    return {} if "RAY_worker_niceness" in os.environ else {"env_vars": {"RAY_worker_niceness": "0"}}
