"""How sft and grpo are launched (stages/launch.py, params `launch`, recipes/accelerate/) and the
vLLM rollout server started around grpo (stages/common/vllm_server.serve), in seconds.

The server tests use a test double, tests/standin_vllm_server.py: `trl vllm-serve` needs a GPU.
The 2-process runs themselves are in tests/test_distributed.py.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stages import launch
from stages.common import vllm_server
from stages.common.params import ROOT, ParamsError
from tests.conftest import tiny
from tests.servers import free_port

STANDIN = Path(__file__).with_name("standin_vllm_server.py")
SERVER = {"grpo": {"vllm_mode": "server"}, "model": {"generation": "vllm"}}


# ------------------------------------------------------------------ params
@pytest.mark.parametrize("overrides, phrase", [
    ({"launch": {"machine_rank": 2, "num_machines": 2, "num_processes": 2, "main_process_ip": "10.0.0.1"}},
     "machine_rank (2) must be below num_machines (2)"),
    ({"launch": {"num_machines": 2, "num_processes": 3, "main_process_ip": "10.0.0.1"}}, "must be a multiple of num_machines"),
    ({"launch": {"num_machines": 2, "num_processes": 2}}, "set main_process_ip"),
    ({"launch": {"num_processes": 2, "gpus": [0]}}, "must name num_processes / num_machines = 2 GPUs"),
    ({"launch": {"vllm_server": {"gpus": [0], "tensor_parallel_size": 2}}}, "must name 2 different GPUs"),
    ({**SERVER, "launch": {"gpus": [0], "vllm_server": {"enabled": True, "gpus": [0]}}}, "overlap"),
    ({"launch": {"vllm_server": {"enabled": True}}}, "set grpo.vllm_mode: server"),
    ({"launch": {"config": "zero4"}}, "launch.config"),
    ({"launch": {"config": "fsdp2"}, "grpo": {"optim": "adamw_8bit"}}, "grpo.optim is 'adamw_8bit': use adamw_torch"),
])
def test_bad_launch_params_fail_at_load_time(overrides, phrase):  # fsdp2 + 8-bit: seen on 2x H200
    with pytest.raises(ParamsError, match="launch") as err:
        tiny(overrides)
    assert phrase in str(err.value)


# ------------------------------------------------------------------ commands
def test_default_launch_runs_the_stage_as_a_plain_process(capsys):
    assert tiny().launch.plain
    launch.main(["grpo", "--dry-run"])  # params.yaml of this checkout: one process
    assert capsys.readouterr().out.strip().endswith("-m stages.grpo")


def test_accelerate_command_carries_the_layout_from_params():
    params = tiny({"launch": {"num_processes": 4, "num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1",
                              "main_process_port": 29600, "config": "fsdp2"}})
    cmd = launch.accelerate_command(params.launch, "stages.grpo", launch.training_gpus(params.launch))
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and cmd[-2:] == ["-m", "stages.grpo"]
    assert flags["--config_file"] == str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml")
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("4", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29600")
    assert "--gpu_ids" not in cmd


def test_with_a_rollout_server_training_takes_the_other_gpus():
    params = tiny({**SERVER, "launch": {"num_processes": 3, "vllm_server": {"enabled": True, "gpus": [0]}}})
    assert launch.training_gpus(params.launch, device_count=4) == [1, 2, 3]
    cmd = launch.accelerate_command(params.launch, "stages.grpo", [1, 2, 3])
    assert cmd[cmd.index("--gpu_ids") + 1] == "1,2,3"
    with pytest.raises(ParamsError, match="leave 1 for training, but num_processes / num_machines is 3"):
        launch.training_gpus(params.launch, device_count=2)
    assert launch.serves_rollouts(params.launch, "grpo") and not launch.serves_rollouts(params.launch, "sft")
    other_machine = tiny({**SERVER, "launch": {"num_processes": 6, "num_machines": 2, "machine_rank": 1,
                                               "main_process_ip": "10.0.0.1", "vllm_server": {"enabled": True}}})
    assert not launch.serves_rollouts(other_machine.launch, "grpo")


def test_one_training_process_on_a_chosen_gpu_runs_without_accelerate():
    # accelerate refuses its multi-GPU config with a single GPU id (seen on the 2x H200 machine,
    # the server layout: 1 server GPU + 1 training GPU), so one process runs plainly on its GPU
    server = tiny({**SERVER, "launch": {"num_processes": 1, "vllm_server": {"enabled": True, "gpus": [0]}}})
    cmd, env = launch.training_command(server.launch, "stages.grpo", launch.training_gpus(server.launch, device_count=2))
    assert cmd[1:] == ["-m", "stages.grpo"] and env == {"CUDA_VISIBLE_DEVICES": "1"}
    pinned = tiny({"launch": {"gpus": [0]}})
    assert launch.training_command(pinned.launch, "stages.sft", [0]) == ([sys.executable, "-m", "stages.sft"],
                                                                         {"CUDA_VISIBLE_DEVICES": "0"})
    two = tiny({"launch": {"num_processes": 2, "gpus": [0, 1]}})
    cmd, env = launch.training_command(two.launch, "stages.sft", [0, 1])
    assert "accelerate.commands.launch" in cmd and env == {}


def test_server_command_is_trl_vllm_serve_with_the_stage_settings(tmp_path, monkeypatch):
    from stages.common import models, paths

    base_dir = tmp_path / "base"  # what the base_model stage writes for a local model
    (base_dir / "model").mkdir(parents=True)
    (base_dir / "tokenizer").mkdir()
    (base_dir / models.BASE_INFO).write_text(json.dumps({"model": "model", "tokenizer": "tokenizer", "revision": None}))
    monkeypatch.setattr(paths, "path", lambda key: base_dir if key == "base_model" else tmp_path / key)
    params = tiny({**SERVER, "grpo": {"vllm_mode": "server", "vllm_server_port": 8123},
                   "launch": {"vllm_server": {"enabled": True, "gpus": [0, 1], "data_parallel_size": 2}}})
    cmd = launch.server_command(params)
    assert cmd[:5] == [sys.executable, "-m", "trl.cli.main", "vllm-serve", "--model"]
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    info = models.base_info(base_dir)
    assert flags["--model"] == info["model"] and flags["--tokenizer"] == str(info["tokenizer"])
    assert (flags["--port"], flags["--data_parallel_size"], flags["--tensor_parallel_size"]) == ("8123", "2", "1")
    assert flags["--max_model_len"] == str(params.grpo.max_prompt_length + params.grpo.max_completion_length)
    from trl.scripts.vllm_serve import make_parser  # TRL's own parser takes every flag

    script_args, extra = make_parser().parse_args_and_config(cmd[4:], return_remaining_strings=True)
    assert script_args.data_parallel_size == 2 and extra == ["--tokenizer", str(info["tokenizer"])]


def test_set_takes_launch_keys_only():
    assert launch.launch_overrides(["launch.machine_rank=1"]) == {"launch.machine_rank": 1}
    with pytest.raises(ParamsError, match="only launch.\\* keys"):
        launch.launch_overrides(["grpo.beta=0.1"])


def test_sharding_engines_need_what_this_machine_lacks():
    """This CPU machine has neither DeepSpeed nor CUDA: the launcher says so before starting anything."""
    with pytest.raises(ParamsError, match="DeepSpeed is not installed"):
        launch.check_engine(tiny({"launch": {"config": "zero3"}}).launch)
    with pytest.raises(ParamsError, match="no CUDA"):
        launch.check_engine(tiny({"launch": {"config": "fsdp2"}}).launch)


# ------------------------------------------------------------------ accelerate configs
@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"), ("fsdp2", "FSDP")])
def test_accelerate_configs_load_and_every_key_is_an_accelerate_flag(name, kind):
    """accelerate's own loader reads each file; the keys inside deepspeed_config/fsdp_config, which
    the loader passes on unchecked, must each be a flag of `accelerate launch`."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    file = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(file))
    assert config.distributed_type.value == kind and config.mixed_precision == "no"
    assert config.num_processes == -1, "the layout comes from params, not from the file"
    flags = {opt.lstrip("-") for action in launch_command_parser()._actions for opt in action.option_strings}
    nested = {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}
    assert not [key for key in nested if key not in flags]
    if name == "zero3":
        assert nested["zero_stage"] == 3 and nested["zero3_save_16bit_model"]
    if name == "fsdp2":
        assert nested["fsdp_version"] == 2 and nested["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp2_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    """The launcher's environment for fsdp2.yaml, as accelerate builds it, makes a valid FSDP2 plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml"),
                                               "--num_processes", "2", "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert env["ACCELERATE_USE_FSDP"] == "true"


# ------------------------------------------------------------------ the rollout server
def _standin(port: int, state: Path, *extra: str) -> list[str]:
    return [sys.executable, str(STANDIN), "--port", str(port), "--state", str(state), *extra]


def _gone(pid: int, timeout: float = 10) -> bool:
    """Whether the process ends within timeout s (a zombie has ended: init here reaps slowly)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_serve_waits_for_health_and_stops_the_whole_server(tmp_path):
    port, state = free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    with vllm_server.serve(_standin(port, state, "--delay", "1.5"), url, timeout_s=30, log=tmp_path / "server.log",
                           gpus=[2, 3], poll_s=0.2) as server:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            assert resp.status == 200
        started = json.loads((state / "server.json").read_text())
        worker = int((state / "worker.pid").read_text())
        assert started == {"pid": server.pid, "cuda_visible_devices": "2,3"}
    assert server.poll() is not None and _gone(worker), "the server or its worker outlived the block"
    assert "loading the model" in (tmp_path / "server.log").read_text()


def test_a_server_that_dies_while_starting_fails_at_once_with_its_log(tmp_path):
    port, state = free_port(), tmp_path / "state"
    start = time.monotonic()
    with pytest.raises(vllm_server.VLLMServerUnavailable, match="exited with code 3") as err:
        with vllm_server.serve(_standin(port, state, "--delay", "0.2", "--exit-code", "3"), f"http://127.0.0.1:{port}",
                               timeout_s=60, log=tmp_path / "server.log", poll_s=0.2):
            pytest.fail("the block must not run without a healthy server")
    assert time.monotonic() - start < 30
    assert "CUDA out of memory (on purpose)" in str(err.value)
    assert _gone(int((state / "worker.pid").read_text()))


def test_a_server_that_never_gets_healthy_is_stopped_after_the_timeout(tmp_path):
    port, state = free_port(), tmp_path / "state"
    with pytest.raises(vllm_server.VLLMServerUnavailable, match=r"after 4 s \(HTTP 503\)"):
        with vllm_server.serve(_standin(port, state, "--delay", "0", "--health-status", "503"),
                               f"http://127.0.0.1:{port}", timeout_s=4, log=tmp_path / "server.log", poll_s=0.2):
            pytest.fail("the block must not run without a healthy server")
    assert _gone(json.loads((state / "server.json").read_text())["pid"])


def test_the_server_stops_when_its_launcher_is_killed(tmp_path):
    """SIGKILL leaves no `finally` to run: the kernel's parent-death signal stops the server."""
    port, state = free_port(), tmp_path / "state"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
              "from stages.common.vllm_server import serve; import time\n"
              f"with serve({_standin(port, state, '--delay', '0')!r}, 'http://127.0.0.1:{port}', 30, "
              f"Path({str(tmp_path / 'server.log')!r}), poll_s=0.2):\n"
              f"    Path({str(tmp_path / 'healthy')!r}).touch(); time.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "healthy").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the stand-in never became healthy"
            time.sleep(0.1)
        server_pid = json.loads((state / "server.json").read_text())["pid"]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _gone(server_pid), "the server outlived its killed launcher"
        assert _gone(int((state / "worker.pid").read_text())), "the server's worker outlived it"
    finally:
        if launcher.poll() is None:
            launcher.kill()
