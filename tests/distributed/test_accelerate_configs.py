"""The shipped accelerate config files: accelerate's own loader reads them, the CLI overrides the
multi-node placeholders, and gentrain finds them by name."""
import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

from gentrain.errors import GentrainError
from gentrain.launch import accelerate_config_path


@pytest.mark.parametrize("name, kind, machines, processes", [
    ("single_gpu", DistributedType.NO, 1, 1),
    ("multi_gpu", DistributedType.MULTI_GPU, 1, 8),
    ("multi_node", DistributedType.MULTI_GPU, 2, 16),
    ("zero2", DistributedType.DEEPSPEED, 1, 8),
    ("zero3", DistributedType.DEEPSPEED, 1, 8),
    ("zero3_offload", DistributedType.DEEPSPEED, 1, 8),
    ("fsdp2", DistributedType.FSDP, 1, 8),
])
def test_each_file_parses_with_accelerates_loader(name, kind, machines, processes):
    cfg = load_config_from_file(str(accelerate_config_path(name)))
    assert (cfg.distributed_type, cfg.num_machines, cfg.num_processes) == (kind, machines, processes)
    assert cfg.mixed_precision == "no" and not cfg.use_cpu  # precision is gentrain's train.mixed_precision


def test_multi_node_placeholders_are_overridden_on_the_command_line():
    argv = ["--config_file", str(accelerate_config_path("multi_node")), "--num_machines", "4", "--machine_rank", "3",
            "--main_process_ip", "10.0.0.7", "--main_process_port", "23456", "--num_processes", "32",
            "-m", "gentrain", "train", "flow_toy2d"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port,
            args.num_processes) == (4, 3, "10.0.0.7", 23456, 32)
    assert args.multi_gpu and args.rdzv_backend == "static"


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(GentrainError, match=r"no shipped accelerate config named .zero9.; shipped: .*multi_node"):
        accelerate_config_path("zero9")


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node", "zero2", "zero3", "zero3_offload"])
def test_every_multi_process_file_launches_one_torchrun_per_machine(name):
    """With --num_machines 2 each machine must run its own torchrun (machine rank, head address); accelerate's
    default DeepSpeed launcher (pdsh) would instead start `deepspeed --hostfile None`, a 1-machine world."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    argv = ["--config_file", str(accelerate_config_path(name)), "--num_machines", "2", "--machine_rank", "1",
            "--main_process_ip", "10.0.0.7", "--main_process_port", "23456", "--num_processes", "4",
            "-m", "gentrain", "train", "flow_toy2d"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []  # what accelerate's deepspeed_launcher sets first
        cmd, _ = prepare_deepspeed_cmd_env(args)
        assert cmd is None, cmd  # None: the torchrun path, with the node rank and head below
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "2")
        assert args.rdzv_endpoint == "10.0.0.7:23456"  # machine 0's rendezvous store
    else:
        assert args.multi_gpu and (args.num_machines, args.machine_rank) == (2, 1)
