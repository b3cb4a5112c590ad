"""HPC providers without a scheduler: their config fails at start naming the field, batch scripts
render what the site asked for (and are valid bash), and scheduler answers map to node states."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from services.scaler.providers import batch_script
from services.scaler.providers.base import NodeSpec
from services.scaler.providers.pbs import PbsProvider, status_of
from services.scaler.providers.slurm import SlurmProvider, _seconds, _status
from shared.config import ConfigError, load_config
from shared.provider_config import PbsSettings, SlurmSettings

CLUSTER = """
[[clusters]]
name = "polaris"
{cluster}

[[models]]
id = "m"
engine = {{ kind = "sim" }}
"""


def load(tmp_path: Path, cluster: str):
    path = tmp_path / "first.toml"
    path.write_text(CLUSTER.format(cluster=cluster))
    return load_config(path)


def load_error(tmp_path: Path, cluster: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, cluster)
    return str(info.value)


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        (
            'provider = "slurm"\n[clusters.slurm]\npartitoin = "gpu"',
            "unknown field `partitoin` - at `$.clusters[0].slurm`",
        ),
        (
            'provider = "slurm"\n[clusters.slurm]\npoll_interval_s = 0',
            "`$.clusters[0].slurm.poll_interval_s`",
        ),
        (
            'provider = "pbs"\n[clusters.slurm]\npartition = "gpu"',
            "$.clusters[0].slurm: set, but the cluster's provider is 'pbs'",
        ),
        (
            'provider = "globus_compute"',
            "$.clusters[0].globus_compute: provider 'globus_compute' needs this table",
        ),
        (
            'provider = "globus_compute"\n[clusters.globus_compute]\nendpoint_id = "nope"',
            "$.clusters[0].globus_compute.endpoint_id",
        ),
        ('provider = "pbs"\n[clusters.pbs]\ngpu_env = "CUDA VISIBLE"', "$.clusters[0].pbs.gpu_env"),
        ('provider = "sge"', "$.clusters[0].provider"),
        ('[clusters.pbs]\nqueue = "debug"', "$.clusters[0].pbs: set, but the cluster's provider is 'local'"),
    ],
)
def test_provider_settings_fail_at_start_naming_the_field(tmp_path, cluster, expected):
    assert expected in load_error(tmp_path, cluster)


def test_a_site_template_is_read_and_checked_at_start(tmp_path):
    where = "$.clusters[0].slurm.script_template"
    table = 'provider = "slurm"\n[clusters.slurm]\nscript_template = "job.sh"'
    assert f"{where}: cannot read {tmp_path / 'job.sh'}" in load_error(tmp_path, table)
    (tmp_path / "job.sh").write_text("#!/bin/bash\n{{directives}}\n{{modle}}\n{{workers}}\n")
    assert f"{where}: unknown placeholder(s) ['modle']" in load_error(tmp_path, table)
    (tmp_path / "job.sh").write_text("#!/bin/bash\n{{directives}}\n")
    assert f"{where}: the template must contain {{{{workers}}}}" in load_error(tmp_path, table)
    (tmp_path / "job.sh").write_text("#!/bin/bash\n{{directives}}\nmodule load conda\n{{workers}}\n")
    config = load(tmp_path, table)
    assert config.cluster("polaris").slurm.script_template == str(tmp_path / "job.sh")


def test_local_clusters_need_no_table(tmp_path):
    cluster = load(tmp_path, "").cluster("polaris")
    assert (cluster.provider, cluster.slurm, cluster.pbs, cluster.globus_compute) == (
        "local",
        None,
        None,
        None,
    )


def bash_syntax_ok(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0


def test_a_slurm_script_asks_for_what_the_site_configured_and_tells_the_workers_the_walltime(tmp_path):
    settings = SlurmSettings(
        partition="gpu", account="FIRST", qos="normal", nodes=1, gres="gpu:4", constraint="a100",
        cpus_per_task=8, extra_directives=["--exclusive"], setup=["module load conda", "export HF_HUB_OFFLINE=1"],
        gpus_per_worker=1, first_command="/soft/first/bin/first", config_path="/lus/first.toml",
        credentials_dir="/lus/creds", work_dir=str(tmp_path),
    )  # fmt: skip
    provider = SlurmProvider(settings, config_path="ignored.toml", nats_url="nats://hub:4222")
    spec = NodeSpec(
        "polaris-1a2b",
        "meta-llama/Llama-3-8B",
        "polaris",
        workers=("polaris-n0", "polaris-n1"),
        walltime_s=3600,
    )
    script = provider.script(spec)
    for line in (
        "#SBATCH --job-name=first-polaris-1a2b", "#SBATCH --partition=gpu", "#SBATCH --account=FIRST",
        "#SBATCH --qos=normal", "#SBATCH --gres=gpu:4", "#SBATCH --constraint=a100", "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=01:00:00", "#SBATCH --exclusive", "module load conda", "export HF_HUB_OFFLINE=1",
        "CUDA_VISIBLE_DEVICES=0 /soft/first/bin/first worker --config /lus/first.toml --nats nats://hub:4222"
        " --cluster polaris --model meta-llama/Llama-3-8B --worker-id polaris-n0 --node-id polaris-1a2b"
        " --credentials /lus/creds/polaris-n0.nk --walltime 3600 &",
        "CUDA_VISIBLE_DEVICES=1 /soft/first/bin/first worker",
    ):  # fmt: skip
        assert line in script, line
    assert script.index("#SBATCH") < script.index("module load conda") < script.index("first worker")
    assert bash_syntax_ok(script)


def test_a_node_without_named_workers_runs_one_worker_named_after_it(tmp_path):
    provider = SlurmProvider(
        SlurmSettings(work_dir=str(tmp_path)), config_path="/c.toml", nats_url="nats://n"
    )
    script = provider.script(NodeSpec("a-n3", "m", "a"))
    assert script.count(" worker --config ") == 1 and "--worker-id a-n3 --node-id a-n3" in script
    assert "--time" not in script and "--walltime" not in script and "--credentials" not in script


def test_a_site_template_wraps_the_workers(tmp_path):
    (tmp_path / "t.sh").write_text(
        "#!/bin/bash\n{{directives}}\n# {{job_name}} for {{model}}\nsource /soft/env\n{{workers}}\n"
    )
    settings = SlurmSettings(script_template=str(tmp_path / "t.sh"), work_dir=str(tmp_path))
    script = SlurmProvider(settings, config_path="/c.toml", nats_url="nats://n").script(
        NodeSpec("a-x", "m", "a")
    )
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=first-a-x\n")
    assert "# first-a-x for m\nsource /soft/env\nfirst_pids=()" in script and bash_syntax_ok(script)


def test_pbs_qsub_names_select_walltime_filesystems_queue_and_account(tmp_path):
    settings = PbsSettings(
        queue="prod", account="FIRST", nodes=2, ncpus=64, ngpus=4, select_extra="system=polaris",
        filesystems="home:eagle", place="scatter", extra_directives=["-k doe"], work_dir=str(tmp_path),
    )  # fmt: skip
    provider = PbsProvider(settings, config_path="/c.toml", nats_url="nats://n")
    spec = NodeSpec("p-1", "m", "p", walltime_s=5400.2)
    assert provider.qsub_argv(Path("/s.sh"), spec) == [
        "qsub", "-N", "first-p-1", "-j", "oe", "-o", str(tmp_path / "p-1.out"),
        "-l", "select=2:ncpus=64:ngpus=4:system=polaris", "-l", "walltime=01:30:01",
        "-l", "filesystems=home:eagle", "-l", "place=scatter", "-q", "prod", "-A", "FIRST", "/s.sh",
    ]  # fmt: skip
    assert "#PBS -k doe" in provider.script(spec) and bash_syntax_ok(provider.script(spec))


@pytest.mark.parametrize(
    ("state", "reason", "phase", "text", "failed"),
    [
        ("PENDING", "Resources", "queued", "PENDING: Resources", False),
        ("PENDING", "None", "queued", "PENDING", False),
        ("CONFIGURING", "None", "queued", "CONFIGURING", False),
        ("RUNNING", "None", "running", "", False),
        ("COMPLETED", "None", "ended", "COMPLETED: the job's workers exited", False),
        ("TIMEOUT", "TimeLimit", "ended", "TIMEOUT: the job reached its time limit (TimeLimit)", True),
        ("NODE_FAIL", "None", "ended", "NODE_FAIL: a node of the job failed", True),
        (
            "FAILED",
            "NonZeroExitCode",
            "ended",
            "FAILED: a worker exited with an error (NonZeroExitCode)",
            True,
        ),
        ("CANCELLED by 0", "None", "ended", "CANCELLED: the job was cancelled (scancel)", True),
    ],
)
def test_slurm_states_map_to_node_phases_with_a_reason(state, reason, phase, text, failed):
    status = _status(state, reason, {})
    assert (status.phase, status.reason, status.failed) == (phase, text, failed)


def test_slurm_time_limits():
    assert [_seconds(t) for t in ("1:00:00", "30:00", "1-02:00:00", "UNLIMITED", "")] == [
        3600,
        1800,
        93600,
        None,
        None,
    ]


def test_qstat_json_jobs_map_to_node_phases_with_pbs_words():
    queued = status_of(
        {"job_state": "Q", "comment": "Not Running: Insufficient amount of resource: ngpus (R: 8 A: 4 T: 4)",
         "Resource_List": {"nodect": 2, "walltime": "01:00:00"}, "estimated": {"start_time": "Fri Nov 27 15:00:00 2026"}}
    )  # fmt: skip
    assert queued.phase == "queued" and queued.reason.startswith("Q: Not Running: Insufficient amount")
    assert queued.details["nodes_reserved"] == 2 and queued.details["walltime"] == 3600
    assert queued.details["estimated_start"] == time.mktime(
        time.strptime("Fri Nov 27 15:00:00 2026", "%a %b %d %H:%M:%S %Y")
    )
    running = status_of({"job_state": "R", "exec_host": "x3005c0s7b0n0/0*64+x3005c0s7b1n0/0*64"})
    assert (running.phase, running.details["host"]) == ("running", "x3005c0s7b0n0+x3005c0s7b1n0")
    walltime = status_of(
        {"job_state": "F", "Exit_status": -29, "comment": "job killed: walltime 3630 exceeded limit 3600"}
    )
    assert walltime.failed and walltime.reason == (
        "finished: the job reached its walltime (job killed: walltime 3630 exceeded limit 3600)"
    )
    assert status_of({"job_state": "F", "Exit_status": 0}).failed is False
    assert status_of({"job_state": "F", "Exit_status": 265}).reason == "finished: killed by signal 9"
    assert status_of({"job_state": "F", "Exit_status": 1}).reason == "finished: a worker exited with status 1"


def test_walltimes_round_up_to_whole_seconds():
    assert [batch_script.clock(s) for s in (59.1, 3600, 90000)] == ["00:01:00", "01:00:00", "25:00:00"]


def test_a_vllm_launch_template_becomes_its_command_line_and_environment():
    import msgspec

    from services.worker.engines.vllm import vllm_engine
    from shared import config as cfg

    settings = msgspec.convert(
        {"kind": "vllm", "model": "/lus/eagle/models/Llama-3.1-70B", "port": 8001, "tensor_parallel_size": 4,
         "max_model_len": 8192, "args": ["--enable-chunked-prefill"], "env": {"HF_HUB_OFFLINE": "1"}},
        cfg.VllmEngine,
    )  # fmt: skip
    process = vllm_engine("meta-llama/Llama-3.1-70B", settings).process
    assert process.argv[process.argv.index("serve") :] == [
        "serve", "/lus/eagle/models/Llama-3.1-70B", "--host", "127.0.0.1", "--port", "8001",
        "--served-model-name", "meta-llama/Llama-3.1-70B", "--tensor-parallel-size", "4",
        "--max-model-len", "8192", "--enable-chunked-prefill",
    ]  # fmt: skip
    assert process.env["HF_HUB_OFFLINE"] == "1" and "PATH" in process.env
    plain = vllm_engine("m", cfg.VllmEngine()).process
    assert plain.env is None and "--tensor-parallel-size" not in plain.argv


def test_the_site_configs_in_docs_providers_md_load(tmp_path):
    """Each TOML example of docs/providers.md is a valid config (with a model or a cluster added)."""
    import re

    docs = (Path(__file__).resolve().parents[2] / "docs" / "providers.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", docs, re.S)
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        text = block
        if "[[models]]" not in text:
            text += '\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'
        if "[[clusters]]" not in text:
            text = '[[clusters]]\nname = "polaris"\nprovider = "pbs"\n' + text
        path = tmp_path / f"example{i}.toml"
        path.write_text(text)
        load_config(path)
