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
                       resumes on any number of processes. trainer.fsdp_replicate=nodes: HSDP,
                       sharded within each node and replicated across nodes.

Under SLURM (`SLURM_NTASKS` set by srun or submitit) SLURM starts the ranks, one task per device;
Lightning only joins them, so `trainer.devices` x `trainer.num_nodes` must equal the task layout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

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


def check_layout(trainer_cfg: DictConfig, environ=os.environ, machine: Machine | None = None) -> None:
    """Refuse a strategy name we do not know, devices this machine does not have, and a SLURM
    allocation whose tasks do not match the config's devices x nodes or that srun did not start
    (Lightning would otherwise fail deep inside, hang, or silently train on fewer ranks)."""
    if trainer_cfg.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={trainer_cfg.strategy!r} is not one of {list(STRATEGIES)}")
    check_devices(trainer_cfg, machine or Machine.here())
    replicate = trainer_cfg.get("fsdp_replicate")
    if replicate not in REPLICATE:
        raise ConfigError(f"trainer.fsdp_replicate={replicate!r} is not one of {list(REPLICATE)}")
    if replicate and trainer_cfg.strategy != "fsdp":
        raise ConfigError(f"trainer.fsdp_replicate={replicate} is for trainer.strategy=fsdp (HSDP), not {trainer_cfg.strategy}")
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", 1)))
    started = int(environ.get("SLURM_STEP_NUM_TASKS", 1))  # srun's tasks; the batch script itself is one process
    if tasks > 1 and started != tasks:
        raise ConfigError(
            f"SLURM allocated {tasks} tasks but started {started} process(es) here: `python train.py` inside an sbatch "
            f"script runs once, as the batch script, and would wait for {tasks - started} rank(s) that never start. "
            f"Start one process per task with srun: `srun python train.py ...` (scripts/sbatch_train.sh does)"
        )
    per_node = devices_per_node(trainer_cfg)
    if tasks != per_node * int(trainer_cfg.num_nodes) or nodes != int(trainer_cfg.num_nodes):
        raise ConfigError(
            f"SLURM started {tasks} task(s) on {nodes} node(s), but trainer.devices={trainer_cfg.devices} x "
            f"trainer.num_nodes={trainer_cfg.num_nodes} asks for {per_node * int(trainer_cfg.num_nodes)} on "
            f"{trainer_cfg.num_nodes}: launch one task per device (hydra.launcher.tasks_per_node=<devices> "
            f"nodes=<num_nodes>, or srun --ntasks-per-node=<devices>), or set trainer.devices/num_nodes to match"
        )


@dataclass(frozen=True)
class Machine:
    """What this machine offers a run: CUDA devices and CPU cores."""

    cuda_devices: int
    cpu_cores: int
    bf16_gpu: bool  # the CUDA devices compute in bfloat16 (Ampere and newer)
    torch_version: str = torch.__version__

    @classmethod
    def here(cls) -> Machine:
        cuda = torch.cuda.is_available()
        return cls(cuda_devices=torch.cuda.device_count() if cuda else 0, cpu_cores=os.cpu_count() or 1,
                   bf16_gpu=cuda and torch.cuda.is_bf16_supported())


ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
ON_CPU = "trainer.accelerator=cpu trainer.precision=32-true"  # DDP/FSDP over CPU processes (gloo)


def check_devices(trainer_cfg: DictConfig, machine: Machine) -> None:
    """Refuse an accelerator or a device count this machine cannot give, saying what would run."""
    accelerator, devices, precision = trainer_cfg.accelerator, trainer_cfg.devices, str(trainer_cfg.precision)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not one of {list(ACCELERATORS)}")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and machine.cuda_devices > 0)
    if on_gpu and machine.cuda_devices == 0:
        instead = ("trainer=cpu" if trainer_cfg.strategy == "auto" else
                   f"{ON_CPU} to run trainer.strategy={trainer_cfg.strategy} over CPU processes")
        raise ConfigError(f"trainer.accelerator={accelerator} needs a CUDA GPU, but torch {machine.torch_version} sees none "
                          f"here (torch.cuda.is_available() is False): use {instead}")
    if isinstance(devices, str):
        if devices != "auto":
            raise ConfigError(f"trainer.devices={devices!r} must be a number of devices >= 1, a list of GPU indices, or auto")
        return
    indices = None if isinstance(devices, int) else list(devices)  # a list names GPUs
    wanted = devices if indices is None else len(indices)
    if wanted < 1:
        raise ConfigError(f"trainer.devices={devices} must be >= 1 (or auto: every visible GPU, one process on a CPU)")
    available = machine.cuda_devices if on_gpu else machine.cpu_cores
    if wanted > available or (indices and on_gpu and max(indices) >= available):
        what = "CUDA device(s)" if on_gpu else "CPU core(s) (one process per device)"
        raise ConfigError(f"trainer.devices={indices or devices} but this machine has {available} {what}: "
                          f"use trainer.devices<={available} (per node; trainer.num_nodes for more)")
    if on_gpu and precision.startswith("bf16") and not machine.bf16_gpu:
        raise ConfigError(f"trainer.precision={precision} needs bfloat16, which this GPU does not compute (pre-Ampere): "
                          f"use trainer.precision=16-mixed or 32-true")


def build_strategy(trainer_cfg: DictConfig):
    """The Lightning strategy for trainer.strategy (see the module docstring)."""
    if trainer_cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size_of(trainer_cfg), tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if trainer_cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # broadcast_buffers: the models' only buffers are RoPE tables, computed alike on every rank
        return DDPStrategy(find_unused_parameters=False, broadcast_buffers=False)
    return "auto"


LAUNCH_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")  # what Lightning's launcher sets


def lightning_starts_ranks(trainer_cfg: DictConfig, environ=os.environ) -> bool:
    """Whether Lightning will start this node's other ranks itself (no SLURM, no torchrun)."""
    externally = "LOCAL_RANK" in environ or bool(cluster_plugins())
    return trainer_cfg.strategy != "auto" and devices_per_node(trainer_cfg) > 1 and not externally


@contextlib.contextmanager
def ranks_run_this_job_only(trainer_cfg: DictConfig, run_dir: str):
    """In a multirun (`python train.py -m ... trainer=ddp`) each job's extra ranks must run that job.
    Lightning starts them with this process's argv (the whole sweep, `-m` included) and Hydra's
    run.dir: within this context they are the job's own overrides and run dir. After it the process
    group is destroyed and the launcher's environment variables are put back, so the next job starts
    its ranks afresh instead of waiting for the last job's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and lightning_starts_ranks(trainer_cfg)):
        yield
        return
    hydra_cfg, argv = HydraConfig.get(), sys.argv
    environ = {key: os.environ.get(key) for key in LAUNCH_ENVIRONMENT}
    sys.argv = [argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = str(run_dir)
    try:
        yield
    finally:
        sys.argv = argv
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cluster_plugins() -> list:
    """Under SLURM, Lightning's SLURM environment without its auto-requeue (trainer/preemption.py
    owns stopping and requeueing; Lightning's would checkpoint inside the signal handler)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


REPLICATE = (None, "nodes")  # trainer.fsdp_replicate


def replicas_of(trainer_cfg: DictConfig) -> int:
    """FSDP's replica groups: 1 (shard over every rank), or one per node (HSDP: trainer.fsdp_replicate=nodes)."""
    return int(trainer_cfg.num_nodes) if trainer_cfg.get("fsdp_replicate") == "nodes" else 1


def fsdp_mesh(flat_mesh, replicas: int):
    """The mesh `fully_shard` gets: Lightning's flat data-parallel mesh, or with replicas > 1 a 2-D
    (replicate, shard) mesh: parameters sharded over the ranks of a node (all-gathers and
    reduce-scatters on its fast links) and replicated across nodes (one all-reduce of the sharded
    gradients per step)."""
    if replicas == 1:
        return flat_mesh
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(flat_mesh.device_type, (replicas, flat_mesh.size() // replicas), mesh_dim_names=("replicate", "shard"))


def is_fsdp(module: torch.nn.Module) -> bool:
    """Whether `module` was sharded by FSDP2's fully_shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(module, FSDPModule)


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
