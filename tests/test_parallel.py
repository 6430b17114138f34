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
from trainer.parallel import build_strategy, check_layout, world_size_of
from trainer.preemption import StopRequest, requeue_slurm_job, slurm_job_id


def trainer_cfg(**overrides):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", **overrides})


def test_world_size_is_devices_times_nodes():
    assert world_size_of(trainer_cfg(devices=4, num_nodes=2)) == 8
    assert world_size_of(trainer_cfg(devices=[0, 1])) == 2
    assert world_size_of(trainer_cfg(devices="auto")) == 1  # CPU


def test_slurm_layout_must_match_the_trainer():
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "train"}
    check_layout(trainer_cfg(devices=8, strategy="ddp"), environ=slurm)
    with pytest.raises(ConfigError) as error:
        check_layout(trainer_cfg(devices=1), environ=slurm)
    assert ("SLURM started 8 task(s) on 1 node(s), but trainer.devices=1 x trainer.num_nodes=1 asks for 1 on 1: "
            "launch one task per device (hydra.launcher.tasks_per_node=<devices>") in str(error.value)
    with pytest.raises(ConfigError, match="on 2 node"):
        check_layout(trainer_cfg(devices=4), environ={**slurm, "SLURM_JOB_NUM_NODES": "2"})
    check_layout(trainer_cfg(devices=1), environ={**slurm, "SLURM_JOB_NAME": "interactive"})  # salloc shell: not SLURM's ranks
    check_layout(trainer_cfg(devices=1), environ={})


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
    class OneDevice:
        world_size, root_device = 1, torch.device("cpu")

    request = StopRequest()
    request.install()
    try:
        assert request.agreed(OneDevice()) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert request.agreed(OneDevice()) == signal.SIGUSR1
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
