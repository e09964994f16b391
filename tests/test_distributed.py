"""Multi-process start-up: environment detection and the launch scripts' commands.

The real 2-process run of the CLI through launch/multinode.sh is in
test_device_agreement.py (it also checks the result against 1 and 8 devices).
"""

import os
import shlex
import subprocess

import pytest

from dpo_jax import distributed
from tests.fixtures import REPO


@pytest.mark.parametrize(
  "env,expected",
  [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # One task: single-process.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "SLURM job with 16 tasks"),
    ({"SLURM_NTASKS": "16"}, None),  # Not inside a job (e.g. a login-node shell).
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI job with 4 ranks"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, "TPU slice with several workers"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # A single-host TPU VM.
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS is set"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": ""}, None),
  ],
)
def test_multi_process_env(env, expected):
  assert distributed.multi_process_env(env) == expected


def test_initialize_decides_without_touching_jax():
  # Nothing to do: no call into jax.distributed (which would fail without peers).
  assert distributed.initialize("auto", env={}) is False
  assert distributed.initialize("off", env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}) is False
  with pytest.raises(ValueError, match="contradicts"):
    distributed.initialize("off", process_id=0, env={})
  with pytest.raises(ValueError, match="expected one of"):
    distributed.initialize("yes", env={})


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
  """The command a launch script would run (DRY_RUN=1), split back into arguments."""
  out = subprocess.run(
    ["bash", os.path.join(REPO, "launch", script), *args],
    env={**os.environ, "DRY_RUN": "1", **env},
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return shlex.split(out)


def test_tpu_pod_script_runs_the_same_command_on_every_host():
  env = {"TPU_NAME": "pod", "ZONE": "us-east5-a", "PROJECT": "proj"}
  spaced = "--config.data.path=gs://bucket/pick a pic"
  cmd = _dry_run("tpu_pod.sh", "train", "--config=configs/sdxl.py", spaced, **env)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert {"--zone=us-east5-a", "--worker=all", "--project=proj"} <= set(cmd)
  remote = shlex.split(next(a for a in cmd if a.startswith("--command="))[len("--command=") :])
  i = remote.index("python")
  assert remote[i : i + 6] == [
    "python", "-m", "dpo_jax.train", "--distributed=on", "--config=configs/sdxl.py", spaced
  ]  # fmt: skip
  assert remote[i + 6 :] == [">", "train.log", "2>&1", "<", "/dev/null", "&"]
  cache = _dry_run("tpu_pod.sh", "cache", "--output=gs://b/c", **env)
  assert "python -m dpo_jax.data.cache --distributed=on --output=gs://b/c" in " ".join(cache)
  with pytest.raises(subprocess.CalledProcessError):  # TPU_NAME is required.
    _dry_run("tpu_pod.sh", "train", ZONE="z", TPU_NAME="")


def test_slurm_script_starts_one_task_per_gpu_with_the_entry_point():
  cmd = _dry_run("slurm_gpu.sbatch", "--config=configs/sd15.py", "--workdir=/shared/r")
  assert cmd == [
    "srun", "--kill-on-bad-exit=1", "python", "-m", "dpo_jax.train", "--distributed=on",
    "--config=configs/sd15.py", "--workdir=/shared/r",
  ]  # fmt: skip
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
    directives = [line for line in f if line.startswith("#SBATCH")]
  per_node = {d.split("=")[0]: d.split("=")[1].strip() for d in directives if "=" in d}
  assert per_node["#SBATCH --ntasks-per-node"] == per_node["#SBATCH --gpus-per-node"]


def test_tpu_pod_setup_installs_from_the_given_source(tmp_path):
  def setup(src: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "setup"],
      env={**os.environ, "DRY_RUN": "1", "DPO_JAX_SRC": src, "TPU_NAME": "pod", "ZONE": "z"},
      capture_output=True,
      text=True,
    )

  def commands(src: str) -> list[list[str]]:
    proc = setup(src)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]

  def remote(cmd: list[str]) -> str:
    return next(a for a in cmd if a.startswith("--command="))[len("--command=") :]

  # A git URL: every host clones it and installs the clone with jax[tpu].
  (ssh,) = commands("https://git.example/me/dpo_jax")
  assert "git clone https://git.example/me/dpo_jax dpo_jax" in remote(ssh)
  assert "pip install -q -e . 'jax[tpu]" in remote(ssh)
  # A local clone: its HEAD as an archive, copied to every host, unpacked, installed.
  archive, scp, ssh = commands(REPO)
  assert archive[:4] == ["git", "-C", REPO, "archive"] and archive[-1] == "HEAD"
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[5] == archive[archive.index("-o") + 1] and scp[6] == "pod:dpo_jax_src.tar.gz"
  assert "tar -xzf dpo_jax_src.tar.gz -C dpo_jax" in remote(ssh)
  # A wheel file: copied, pip-installed, and its configs package copied to the run directory.
  wheel = tmp_path / "dpo_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  scp, ssh = commands(str(wheel))
  assert scp[5:7] == [str(wheel), f"pod:./{wheel.name}"]
  assert f"pip install -q ./{wheel.name} 'jax[tpu]" in remote(ssh)
  assert '"dpo_jax/configs"' in remote(ssh)
  # Neither a clone nor an existing wheel: one error line, nothing run.
  for src in (str(tmp_path / "x.whl"), str(tmp_path)):
    bad = setup(src)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("error: DPO_JAX_SRC")
