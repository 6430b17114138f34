"""How a run is laid out over processes: the world size, the Lightning strategy, FSDP2 sharding,
and the check that SLURM started the processes the config asks for.

    trainer.strategy   what runs
    auto               one device
    ddp                DistributedDataParallel: replicated weights, gradients all-reduced; every
                       rank runs the same optimizer step on the same averaged gradients
    fsdp               FSDP2 (`fully_shard` per block, then the root) through Lightning's
                       ModelParallelStrategy; weights, gradients and optimizer state are sharded
                       along dim 0, and the Orthogonalize stage gathers each matrix whole
                       (optim/distributed.py). Checkpoints are one full file, so a sharded run
                       resumes on any number of processes.

Under SLURM (`SLURM_NTASKS` set by srun or submitit) SLURM starts the ranks, one task per device;
Lightning only joins them, so `trainer.devices` x `trainer.num_nodes` must equal the task layout.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from trainer.errors import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")


def devices_per_node(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if devices == "auto":
        return torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    return max(1, devices if isinstance(devices, int) else len(devices))


def world_size_of(trainer_cfg: DictConfig) -> int:
    return devices_per_node(trainer_cfg) * int(trainer_cfg.num_nodes)


def check_layout(trainer_cfg: DictConfig, environ=os.environ) -> None:
    """Refuse a strategy name we do not know, and a SLURM allocation whose tasks do not match the
    config's devices x nodes (Lightning would otherwise hang or silently train on fewer ranks)."""
    if trainer_cfg.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={trainer_cfg.strategy!r} is not one of {list(STRATEGIES)}")
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", 1)))
    per_node = devices_per_node(trainer_cfg)
    if tasks != per_node * int(trainer_cfg.num_nodes) or nodes != int(trainer_cfg.num_nodes):
        raise ConfigError(
            f"SLURM started {tasks} task(s) on {nodes} node(s), but trainer.devices={trainer_cfg.devices} x "
            f"trainer.num_nodes={trainer_cfg.num_nodes} asks for {per_node * int(trainer_cfg.num_nodes)} on "
            f"{trainer_cfg.num_nodes}: launch one task per device (hydra.launcher.tasks_per_node=<devices> "
            f"nodes=<num_nodes>, or srun --ntasks-per-node=<devices>), or set trainer.devices/num_nodes to match"
        )


def build_strategy(trainer_cfg: DictConfig):
    """The Lightning strategy for trainer.strategy (see the module docstring)."""
    if trainer_cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size_of(trainer_cfg), tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if trainer_cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def cluster_plugins() -> list:
    """Under SLURM, Lightning's SLURM environment without its auto-requeue (trainer/preemption.py
    owns stopping and requeueing; Lightning's would checkpoint inside the signal handler)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def shard_model(model: torch.nn.Module, mesh, mixed_precision: bool = False) -> None:
    """FSDP2: each transformer block is one unit (gathered for its forward and backward), the
    embeddings, final norm and head the root's. With mixed_precision (trainer.precision=bf16-mixed)
    the gathered weights are bf16 and gradients are reduced in fp32, while the sharded master weights
    and the optimizer state stay fp32 (torchtitan's MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
