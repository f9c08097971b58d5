"""Where a command's work runs: in this process, as Slurm jobs, or as one local job per GPU (issue #11).

``executor: local`` (the default) runs everything in the calling process. ``slurm`` sends each unit of
work (one cache, one profile) to Slurm through submitit; ``gpus`` runs the same jobs on this machine
with submitit's local executor, one job per GPU (``CUDA_VISIBLE_DEVICES``). The Slurm parameters are
the config file's top-level ``executor:`` section (shared by every command); a command's own ``slurm:``
mapping overrides keys of it (profiling on the deployment hardware's partition)::

    executor: {partition: cpu, time: 120, cpus_per_task: 8, mem_gb: 32}
    extract: {executor: slurm, max_jobs: 16}
    profiling: {executor: slurm, slurm: {partition: a100, gpus_per_task: 1}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from configs.settings import CommandSettings, Settings

Executor = Literal["local", "slurm", "gpus"]


class SlurmOptions(Settings):
    partition: str | None = Field(None, description="partition (default: the cluster's default)")
    time: int = Field(60, ge=1, description="time limit of each job, minutes")
    cpus_per_task: int = Field(2, ge=1)
    gpus_per_task: int = Field(0, ge=0)
    mem_gb: float | None = Field(None, gt=0, description="memory per job (default: the partition's)")
    account: str | None = None
    qos: str | None = None
    sbatch: tuple[str, ...] = Field((), description="extra #SBATCH options, e.g. ['--constraint=a100', "
                                    "'--exclude=node7']")
    setup: tuple[str, ...] = Field((), description="shell lines run before Python in each job, e.g. "
                                   "['module load cuda/12.4', 'source ~/venv/bin/activate']")

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, lines: tuple[str, ...]) -> tuple[str, ...]:
        for line in lines:
            if not line.startswith("--") or len(line) < 3:
                raise ValueError(f"each entry is a long sbatch option like '--constraint=a100', got {line!r}")
        return lines

    def additional_parameters(self) -> dict[str, str | bool]:
        """``sbatch`` as submitit's ``additional_parameters`` (``--key=value`` -> key: value; a bare flag -> True)."""
        out: dict[str, str | bool] = {}
        for line in self.sbatch:
            key, sep, value = line[2:].partition("=")
            out[key] = value if sep else True
        return out


class JobCommandSettings(CommandSettings):
    """Settings of a command whose work can run as jobs (extract, profiling, finetune)."""

    executor: Executor = Field("local", description="where the work runs: local (this process), slurm (one "
                               "Slurm job per unit, via submitit), gpus (one local job per GPU)")
    max_jobs: int = Field(0, ge=0, description="jobs in flight at most (0: all at once; with gpus: one per GPU)")
    gpus: tuple[int, ...] = Field((), description="with --executor gpus: the GPU indices to use",
                                  json_schema_extra={"default_text": "every visible GPU"})
    slurm: SlurmOptions = Field(SlurmOptions(), description="Slurm parameters (config file: the top-level "
                                "'executor:' section, overridden by this command's 'slurm:')",
                                json_schema_extra={"flag": False})
