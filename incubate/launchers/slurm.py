"""The SLURM launcher (through submitit): the jobs of a phase as one job array. A job has
`nodes` x `devices_per_node` tasks, one task a rank (`execute_rank`: submitit tells each task its
rank, the world and the master's address, exported as torch.distributed's env:// variables), so
the meta model and the fine-tune can span nodes while the K module jobs take one node each.
submitit is an optional extra (`pip install 'deep-incubate[slurm]'`)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .base import gpus_a_node
from .job import Job, Resources
from .process import execute
from .scheduler import reason


def execute_rank(job: Job, res: Resources) -> int:
    """One rank of a multi-task SLURM job: join the job's process group through env://, run the stage.

    submitit's TorchDistributedEnvironment reads the task's place (SLURM_PROCID, the job's first
    host, a port drawn from the job id: the same in every task) and exports RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which setup_dist's init_process_group
    reads. Every task of a node sees the node's GPUs; LOCAL_RANK picks one (setup_dist).
    """
    from submitit.helpers import TorchDistributedEnvironment
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)      # inherited from the submitting shell: export() refuses to overwrite
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return execute(job, Resources(procs=1, threads=res.threads))


def _task_outcome(task) -> tuple[int, str]:
    """One task's (rank's) exit code, and why it failed ("" when it did not)."""
    try:
        rc = task.result()
    except Exception:       # no result at all: the task itself died (killed, timed out, node failure, preempted)
        return 1, f"ended without a result (SLURM task {task.job_id}, state {task.state})"
    return rc, reason(rc) if rc else ""


def job_outcome(sj) -> tuple[int, str]:
    """A finished job's exit code and one line on why it failed, naming the rank that started it.

    When one rank dies the others fail after it (a collective meets a closed connection), so the
    rank that died of a signal or without a result is named first, then any other failing rank."""
    outcomes = [_task_outcome(sj.task(i)) for i in range(sj.num_tasks)]
    failed = [(r, rc, why) for r, (rc, why) in enumerate(outcomes) if rc != 0]
    if not failed:
        return 0, ""
    if sj.num_tasks == 1:
        return failed[0][1], failed[0][2]
    failed.sort(key=lambda f: not (f[1] < 0 or f[2].startswith("ended")))      # stable: else by rank
    (rank, rc, why), rest = failed[0], failed[1:]
    others = "".join(f"; then rank {r}: {w}" for r, _, w in rest)
    return rc, f"rank {rank} of {sj.num_tasks}: {why} (SLURM job {sj.job_id}{others})"


class SlurmLauncher:
    """The jobs of a phase go to SLURM as one job array (`map_array`), at most --jobs running at once.

    A job has the stage's shape (`launch.stages.<stage>`): `nodes` x `devices_per_node` tasks, one
    a rank. `launch.slurm` holds submitit parameters (slurm_partition, timeout_min, slurm_account,
    ...); its key `cluster` picks the executor (default: SLURM when `srun` exists; `local`, one
    node only, for tests).
    """
    name = "slurm"

    def __init__(self, recipe, run: Path):
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs submitit: pip install 'deep-incubate[slurm]'") from None
        params = dict(recipe.launch.slurm)
        cluster = params.pop("cluster", None)
        for key, shape_key in (("nodes", "nodes"), ("tasks_per_node", "devices_per_node"),
                               ("gpus_per_node", "devices_per_node"), ("cpus_per_task", "cpus_per_task")):
            if key in params:       # one place for a job's shape: launch.stages (or the launch-wide defaults)
                raise UserError(f"launch.slurm.{key}: a job's shape is set per stage, launch.stages.<stage>."
                                f"{shape_key} (or launch.devices_per_job / launch.cpus_per_job for every stage)")
        try:
            self.executor = submitit.AutoExecutor(folder=Path(run) / "slurm" / "%j", cluster=cluster)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--launcher slurm: {e}; run on a SLURM login node or set launch.slurm.cluster") from None
        self.recipe, self.launch, self.params = recipe, recipe.launch, params
        self.batch: list = []        # jobs submitted since the last poll: they go out as one array
        self.task = execute

    def plan(self, stage: str, n_jobs: int, parallel: int) -> tuple[int, Resources]:
        shape = self.launch.shape(stage)
        procs = max(1, shape.devices_per_node)
        res = Resources(procs=procs, threads=shape.cpus_per_task or 1, nodes=shape.nodes,
                        gpus=gpus_a_node(self.recipe, shape.devices_per_node))
        # One task a rank: a job of one process runs the stage itself, a bigger one runs execute_rank.
        self.task = execute if shape.nodes * procs == 1 else execute_rank
        params = {"timeout_min": 60 * 24 * 3, **self.params, "nodes": shape.nodes, "tasks_per_node": procs,
                  "cpus_per_task": res.threads, "gpus_per_node": res.gpus,
                  "slurm_array_parallelism": max(1, parallel)}
        if shape.time_min:
            params["timeout_min"] = shape.time_min
        try:
            self.executor.update_parameters(**params)
        except (ValueError, TypeError) as e:
            raise UserError(f"launch.slurm or launch.stages.{stage}: {e}") from None
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
        jobs = self.executor.map_array(self.task, [j for j, _, _ in batch], [r for _, r, _ in batch])
        for (_, _, handle), sj in zip(batch, jobs):
            handle["job"] = sj

    def poll(self, handle) -> tuple[int | None, str]:
        self._flush()
        sj = handle["job"]
        if not sj.done():
            return None, ""
        return job_outcome(sj)

    def stop(self, handle) -> None:
        if handle["job"] is not None:
            handle["job"].cancel(check=False)
