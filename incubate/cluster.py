"""Launchers on cluster engines: each job a Ray task, or a task of a SLURM job array (submitit).

Both run `launchers.execute` where the engine places the job: it starts the same stage command
as the local launcher, with the devices the engine gave it, and returns its exit code. Ray and
submitit are optional extras (`pip install 'deep-incubate[ray]'` / `'deep-incubate[slurm]'`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .launchers import Job, Resources, execute


def _wants_gpus(recipe) -> int:
    """GPUs a job asks for: launch.devices_per_job unless the recipe runs on CPU."""
    return recipe.launch.devices_per_job if recipe.device != "cpu" else 0


class RayLauncher:
    """One Ray task a job, asking for the recipe's CPUs and GPUs a job; Ray places and queues them."""
    name = "ray"

    def __init__(self, recipe, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--launcher ray needs Ray: pip install 'deep-incubate[ray]'") from None
        self.ray, self.launch, self.gpus = ray, recipe.launch, _wants_gpus(recipe)
        if not ray.is_initialized():
            # address=None starts a local instance unless RAY_ADDRESS names a cluster.
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as e:
                raise UserError(f"cannot reach the Ray cluster at {address}: {e}; start it with "
                                f"`ray start --head` or drop --address for a local instance") from None
        self.task = ray.remote(execute)

    def plan(self, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        procs = max(1, self.launch.devices_per_job)
        return max(1, min(parallel, n_jobs)), Resources(procs=procs, threads=self.launch.cpus_per_job or 1,
                                                        gpus=self.gpus)

    def submit(self, job: Job, res: Resources):
        # max_retries=0: retries are the scheduler's, the same for every launcher.
        return self.task.options(num_cpus=res.threads * res.procs, num_gpus=res.gpus, max_retries=0,
                                 name=f"incubate-{job.label.replace(' ', '-')}").remote(
            job.args(), res, str(job.log))

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


class SlurmLauncher:
    """Jobs go to SLURM as one job array (`map_array`), at most --jobs running at once.

    `launch.slurm` holds submitit parameters (slurm_partition, timeout_min, slurm_account, ...);
    its key `cluster` picks the executor (default: SLURM when `srun` exists; `local` for tests).
    """
    name = "slurm"

    def __init__(self, recipe, run: Path):
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs submitit: pip install 'deep-incubate[slurm]'") from None
        params = dict(recipe.launch.slurm)
        cluster = params.pop("cluster", None)
        try:
            self.executor = submitit.AutoExecutor(folder=Path(run) / "slurm" / "%j", cluster=cluster)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--launcher slurm: {e}; run on a SLURM login node or set launch.slurm.cluster") from None
        self.launch, self.gpus, self.params = recipe.launch, _wants_gpus(recipe), params
        self.batch: list = []        # jobs submitted since the last poll: they go out as one array

    def plan(self, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        procs = max(1, self.launch.devices_per_job)
        res = Resources(procs=procs, threads=self.launch.cpus_per_job or 1, gpus=self.gpus)
        defaults = {"timeout_min": 60 * 24 * 3, "nodes": 1, "tasks_per_node": 1,
                    "cpus_per_task": res.threads * procs, "gpus_per_node": res.gpus,
                    "slurm_array_parallelism": max(1, parallel)}
        try:
            self.executor.update_parameters(**{**defaults, **self.params})
        except (ValueError, TypeError) as e:
            raise UserError(f"launch.slurm: {e}") from None
        return max(1, n_jobs), res

    def submit(self, job: Job, res: Resources):
        # One map_array a batch: submit() only queues; the array goes out on the first poll().
        handle = {"job": None}
        self.batch.append((job, res, handle))
        return handle

    def _flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        jobs = self.executor.map_array(execute, [j.args() for j, _, _ in batch], [r for _, r, _ in batch],
                                       [str(j.log) for j, _, _ in batch])
        for (_, _, handle), sj in zip(batch, jobs):
            handle["job"] = sj

    def poll(self, handle) -> tuple[int | None, str]:
        self._flush()
        sj = handle["job"]
        if not sj.done():
            return None, ""
        try:
            return sj.result(), ""
        except Exception as e:       # submitit raises the task's failure (timeout, node failure, preemption)
            return 1, f"SLURM task {sj.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"

    def stop(self, handle) -> None:
        if handle["job"] is not None:
            handle["job"].cancel(check=False)
