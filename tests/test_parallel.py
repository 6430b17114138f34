"""The pieces of scale-out that need no second process: the SLURM layout check, strategies, the
launcher presets, stop signals, requeue and the optimizer-state numbering of checkpoints."""

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from optim.distributed import gather_whole, shard_like
from trainer.checkpoint import renumber_optimizer_state
from configs import compose
from trainer.errors import ConfigError
from trainer.parallel import Machine, build_strategy, check_layout, world_size_of
from trainer.step_summary import summarize
from trainer.preemption import StopRequest, requeue_slurm_job, slurm_job_id


def trainer_cfg(**overrides):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
                             **overrides})


def test_world_size_is_devices_times_nodes():
    assert world_size_of(trainer_cfg(devices=4, num_nodes=2)) == 8
    assert world_size_of(trainer_cfg(devices=[0, 1])) == 2
    assert world_size_of(trainer_cfg(devices="auto")) == 1  # CPU


GPU_NODE = Machine(cuda_devices=8, cpu_cores=96, bf16_gpu=True)
LAPTOP = Machine(cuda_devices=0, cpu_cores=2, bf16_gpu=False, torch_version="2.13.0+cpu")


def test_slurm_layout_must_match_the_trainer():
    slurm = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "train"}
    check_layout(trainer_cfg(devices=8, strategy="ddp", accelerator="gpu"), environ=slurm, machine=GPU_NODE)
    with pytest.raises(ConfigError) as error:
        check_layout(trainer_cfg(devices=1), environ=slurm, machine=GPU_NODE)
    assert ("SLURM started 8 task(s) on 1 node(s), but trainer.devices=1 x trainer.num_nodes=1 asks for 1 on 1: "
            "launch one task per device (hydra.launcher.tasks_per_node=<devices>") in str(error.value)
    with pytest.raises(ConfigError, match="on 2 node"):
        check_layout(trainer_cfg(devices=4), environ={**slurm, "SLURM_JOB_NUM_NODES": "2"}, machine=GPU_NODE)
    interactive = {**slurm, "SLURM_JOB_NAME": "interactive"}  # salloc shell: not SLURM's ranks
    check_layout(trainer_cfg(devices=1), environ=interactive, machine=GPU_NODE)
    check_layout(trainer_cfg(devices=1), environ={}, machine=GPU_NODE)


def test_python_inside_sbatch_without_srun_is_refused_not_left_waiting():
    """sbatch --ntasks-per-node=8 runs its script once; without srun the other 7 ranks never start."""
    batch_step = {"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "train"}  # no SLURM_STEP_*
    with pytest.raises(ConfigError) as error:
        check_layout(trainer_cfg(devices=8, strategy="ddp", accelerator="gpu"), environ=batch_step, machine=GPU_NODE)
    assert ("SLURM allocated 8 tasks but started 1 process(es) here: `python train.py` inside an sbatch script runs once, "
            "as the batch script, and would wait for 7 rank(s) that never start. Start one process per task with srun: "
            "`srun python train.py ...`") in str(error.value)
    one_task = {"SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "train"}
    check_layout(trainer_cfg(devices=1, accelerator="gpu"), environ=one_task, machine=GPU_NODE)  # one task: no srun needed


@pytest.mark.parametrize("overrides,machine,message", [
    ({"accelerator": "gpu"}, LAPTOP, "trainer.accelerator=gpu needs a CUDA GPU, but torch 2.13.0+cpu sees none here "
                                     "(torch.cuda.is_available() is False): use trainer=cpu"),
    ({"accelerator": "gpu", "strategy": "ddp", "devices": 2}, LAPTOP,
     "use trainer.accelerator=cpu trainer.precision=32-true to run trainer.strategy=ddp over CPU processes"),
    ({"devices": 0}, LAPTOP, "trainer.devices=0 must be >= 1 (or auto: every visible GPU, one process on a CPU)"),
    ({"devices": 3, "strategy": "ddp"}, LAPTOP, "trainer.devices=3 but this machine has 2 CPU core(s) (one process per device): "
                                                "use trainer.devices<=2"),
    ({"accelerator": "gpu", "devices": 16}, GPU_NODE, "trainer.devices=16 but this machine has 8 CUDA device(s)"),
    ({"accelerator": "gpu", "devices": [0, 8]}, GPU_NODE, "trainer.devices=[0, 8] but this machine has 8 CUDA device(s)"),
    ({"accelerator": "gpu", "precision": "bf16-mixed"}, Machine(cuda_devices=1, cpu_cores=8, bf16_gpu=False),
     "trainer.precision=bf16-mixed needs bfloat16, which this GPU does not compute (pre-Ampere): use trainer.precision=16-mixed"),
    ({"accelerator": "tpu"}, LAPTOP, "trainer.accelerator='tpu' is not one of ['cpu', 'gpu', 'cuda', 'auto']"),
])
def test_devices_this_machine_cannot_give_are_refused_with_what_would_run(overrides, machine, message):
    with pytest.raises(ConfigError) as error:
        check_layout(trainer_cfg(**overrides), environ={}, machine=machine)
    assert message in str(error.value)


def test_devices_the_machine_has_pass():
    check_layout(trainer_cfg(devices=2, strategy="ddp"), environ={}, machine=LAPTOP)
    check_layout(trainer_cfg(devices="auto"), environ={}, machine=LAPTOP)
    check_layout(trainer_cfg(accelerator="gpu", devices=[0, 7], precision="bf16-mixed"), environ={}, machine=GPU_NODE)


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"trainer.strategy='fsdp1' is not one of \['auto', 'ddp', 'fsdp'\]"):
        check_layout(trainer_cfg(strategy="fsdp1"), environ={})


def test_strategies():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    assert build_strategy(trainer_cfg()) == "auto"
    assert isinstance(build_strategy(trainer_cfg(strategy="ddp")), DDPStrategy)
    fsdp = build_strategy(trainer_cfg(strategy="fsdp", devices=2, num_nodes=2))
    assert isinstance(fsdp, ModelParallelStrategy)
    assert (fsdp._data_parallel_size, fsdp._tensor_parallel_size, fsdp._save_distributed_checkpoint) == (4, 1, False)


@pytest.mark.parametrize("preset, tasks, gpus, nodes", [("slurm_1gpu", 1, 1, 1), ("slurm_8gpu", 8, 8, 1), ("slurm_multinode", 8, 8, 4)])
def test_launcher_presets(preset, tasks, gpus, nodes):
    cfg = compose([f"hydra/launcher={preset}", "trainer=fsdp", "trainer.num_nodes=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (tasks, gpus, nodes)
    assert launcher.max_num_timeout == 0 and launcher.signal_delay_s == 120  # muonlab owns requeue
    assert launcher._target_.endswith("SlurmLauncher")
    assert OmegaConf.to_container(launcher, resolve=False)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


def test_trainer_configs():
    for name, strategy in (("cpu", "auto"), ("gpu", "auto"), ("ddp", "ddp"), ("fsdp", "fsdp")):
        assert compose([f"trainer={name}"]).trainer.strategy == strategy


def test_a_stop_signal_is_recorded_not_acted_on():
    request = StopRequest()
    request.install()
    try:
        assert request.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert request.signum == signal.SIGUSR1
        summary = summarize(torch.tensor(2.5), torch.tensor(0.75), torch.tensor(96), request.signum, None, world_size=1)
        assert (summary.loss, summary.grad_norm, summary.targets, summary.stop_signal, summary.qk_columns()) == (
            2.5, 0.75, 96.0, signal.SIGUSR1, {})
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGUSR1) is not request._record


def test_slurm_job_ids_and_a_failed_requeue_is_reported_not_raised():
    assert slurm_job_id({"SLURM_JOB_ID": "41"}) == "41"
    assert slurm_job_id({"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1"}) == "40_1"
    assert slurm_job_id({}) is None
    message = requeue_slurm_job("0")
    assert message.startswith(("could not requeue SLURM job 0", "scontrol requeue 0 failed"))


def test_optimizer_state_renumbering():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([b, a], lr=0.1, momentum=0.9)  # optimizer order differs from "module" order [a, b]
    (a.sum() + 2 * b.sum()).backward()
    optimizer.step()
    renumbered = renumber_optimizer_state(optimizer.state_dict(), {0: 1, 1: 0})
    assert renumbered["param_groups"][0]["params"] == [1, 0]
    assert torch.equal(renumbered["state"][1]["momentum_buffer"], torch.full((3,), 2.0))
    fresh = torch.optim.SGD([b, a], lr=0.1, momentum=0.9)
    fresh.load_state_dict(renumbered)  # torch matches by position in the groups, whatever the numbers
    assert torch.equal(fresh.state[b]["momentum_buffer"], torch.full((3,), 2.0))


def test_plain_tensors_pass_through_the_fsdp_helpers():
    x = [torch.randn(3, 4)]
    assert gather_whole(x)[0] is x[0] and shard_like(x, x)[0] is x[0]


def test_batch_counters_follow_the_micro_batches_per_step_of_the_resuming_run():
    from trainer.checkpoint import align_batch_counters

    # saved by 2 ranks after step 7 (1 micro-batch per step), inside the step's last batch
    progress = {"total": {"ready": 7, "started": 7, "processed": 7, "completed": 6}, "is_last_batch": False}
    progress["current"] = dict(progress["total"])
    align_batch_counters(progress, step=7, batches_per_step=2)  # one device: 2 micro-batches per step
    assert progress["total"] == progress["current"] == {"ready": 14, "started": 14, "processed": 14, "completed": 13}


@pytest.mark.parametrize("mixed_precision,param_dtype", [(False, None), (True, torch.bfloat16)])
def test_fsdp_mixed_precision_policy_follows_the_trainer_precision(mixed_precision, param_dtype, tmp_path):
    """bf16-mixed under FSDP2: bf16 gathered weights, fp32 gradient reduction, fp32 sharded master weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models import build_model
    from trainer.parallel import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(OmegaConf.to_container(compose(["model=gpt2_tiny"]).model))
        shard_model(model, init_device_mesh("cpu", (1,)), mixed_precision=mixed_precision)
        policy = model.blocks[0]._get_fsdp_state()._mp_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (param_dtype, torch.float32 if mixed_precision else None)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
