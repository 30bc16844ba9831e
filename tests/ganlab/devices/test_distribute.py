"""--distribute: the CPU split into two logical devices stands in for two GPUs; the maths is the same, runs move
between one device and several."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import unittest.mock

import numpy as np
import pytest
import tensorflow as tf

import gan_mnist
from conftest import REPO, as_from_a_terminal, run_script
from ganlab import models
from ganlab.devices import distribute
from ganlab.errors import UsageError

MIRRORED = ["--distribute", "mirrored", "--cpu-devices", "2"]


@pytest.mark.parametrize("script, flags", [
    ("gan_mnist.py", ["--dropout", "0", "--r1", "1"]),  # Dropout masks are per-replica draws, like the noise.
    ("dcgan_mnist.py", []),                              # Batch norm in G and D, R1 1, the average.
    ("dcgan_mnist.py", ["--conditional", "--g-steps", "2"]),
    # Uneven shares: 8 over 3 replicas is 3, 3, 2; 12 over 8 is four of 2 and four of 1.
    ("dcgan_mnist.py", ["--cpu-devices", "3"]),
    ("gan_mnist.py", ["--dropout", "0", "--r1", "1", "--cpu-devices", "3"]),
    ("dcgan_mnist.py", ["--conditional", "--cpu-devices", "8", "--batch-size", "12"]),
])
@pytest.mark.slow
def test_one_step_on_several_replicas_equals_one_step_on_one_device(script, flags):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "distributed_step.py"), script, "--batch-size", "8",
                             "--precision", "fp32", *flags], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["replicas"] == (int(flags[flags.index("--cpu-devices") + 1]) if "--cpu-devices" in flags else 2)
    for model, difference in report["difference"].items():
        # An Adam step moves a weight by up to the learning rate; the two agree to 5% of it.
        assert difference < 0.05 * report["lr"], (model, difference)
        assert report["moved"][model] > 20 * difference, model  # The step did move: the test can tell.
    assert report["metrics_difference"] < 1e-4


@pytest.mark.slow
def test_a_mirrored_run_writes_its_outputs_once_and_moves_between_device_counts(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    flags = ["--limit", "640", "--batch-size", "64", "--eval-every", "0", "--seed", "2", "--data-dir", str(mnist_dir),
             "--out", str(run_dir)]
    first = run_script("gan_mnist.py", *flags, "--epochs", "1", *MIRRORED)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "MirroredStrategy over 2 replicas of batch 32" in first.stdout
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 64
    gan_mnist.main(["--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir", str(mnist_dir)])  # One device.
    again = run_script("gan_mnist.py", "--resume", "--epochs", "3", "--out", str(run_dir), "--data-dir",
                       str(mnist_dir), *MIRRORED)
    assert again.returncode == 0, again.stderr[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3] and len(history["iterations"]["d_loss"]) == 30
    assert sorted(p.name for p in run_dir.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3  # One writer per process.


def test_a_batch_smaller_than_the_replicas_is_one_line(tmp_path):
    result = run_script("gan_mnist.py", "--batch-size", "1", *MIRRORED, "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "argument --batch-size: 1 is smaller than the 2 replicas of --distribute mirrored" in result.stderr
    assert not (tmp_path / "run").exists()


def test_shares_deal_any_batch_over_any_replica_count():
    assert distribute.shares(100, 8) == [(0, 13), (13, 26), (26, 39), (39, 52), (52, 64), (64, 76), (76, 88),
                                         (88, 100)]
    for batch in (1, 7, 64, 100):
        for replicas in range(1, min(batch, 8) + 1):
            sizes = [end - start for start, end in distribute.shares(batch, replicas)]
            assert sum(sizes) == batch and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("script, devices, batch", [("gan_mnist.py", 3, 100), ("gan_mnist.py", 8, 100),
                                                    ("dcgan_mnist.py", 3, 64), ("dcgan_mnist.py", 8, 64)])
@pytest.mark.slow
def test_the_default_batches_train_on_3_and_8_replicas(tmp_path, mnist_dir, script, devices, batch):
    run_dir = tmp_path / "run"
    result = run_script(script, "--epochs", "1", "--limit", str(2 * batch), "--eval-every", "0", "--data-dir",
                        str(mnist_dir), "--out", str(run_dir), "--distribute", "mirrored", "--cpu-devices", str(devices))
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = sorted({end - start for start, end in distribute.shares(batch, devices)}, reverse=True)
    assert f"MirroredStrategy over {devices} replicas of batch {' or '.join(map(str, sizes))}" in result.stdout
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["batch_size"] == batch  # The recipe's global batch, kept.
    assert len(json.loads((run_dir / "history.json").read_text())["iterations"]["d_loss"]) == 2


OVERFLOW_ON_ONE_REPLICA = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ganlab import keras, models, tf
from ganlab.devices import distribute
from types import SimpleNamespace
distribute.split_cpu(2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
config = SimpleNamespace(lr=0.1, beta1=0.5, beta2=0.999, precision="fp16")
results = {}
for name, make in (("keras", lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.1))),
                   ("guarded", lambda: models.make_optimizer(config, [weight]))):
    with strategy.scope():
        weight = keras.Variable([1.0, 2.0])
        optimizer = make()
        optimizer.build([weight])

    @tf.function
    def step():
        def replica():  # Replica 1's gradient overflows; replica 0's is fine.
            second = tf.distribute.get_replica_context().replica_id_in_sync_group == 1
            optimizer.apply([tf.where(second, tf.constant([float("inf"), 1.0]), tf.constant([1.0, 1.0]))], [weight])
        strategy.run(replica)

    step()
    results[name] = {"weights": [w.numpy().tolist() for w in strategy.experimental_local_results(weight.value)],
                     "scale": float(optimizer.dynamic_scale.numpy())}
print(json.dumps(results))
"""


def test_an_fp16_overflow_on_one_replica_skips_the_step_on_all():
    result = subprocess.run([sys.executable, "-c", OVERFLOW_ON_ONE_REPLICA, str(REPO)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    print(results)
    assert results["keras"]["weights"][0] != [1.0, 2.0]  # Keras alone checks replica 0 only and applies the inf.
    assert results["guarded"]["weights"] == [[1.0, 2.0], [1.0, 2.0]]  # Skipped on both replicas,
    assert results["guarded"]["scale"] == 2.0 ** 14  # and the loss scale halved from 2**15, as on one device.


# ------------------------------------------------------------------------------------------------
# Two worker processes on localhost: MultiWorkerMirroredStrategy through TF_CONFIG
# ------------------------------------------------------------------------------------------------


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("localhost", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def start_workers(run_dir, mnist_dir, temporary, *flags):
    """Two workers of one cluster, each its own process (CPU only), as two machines would run them."""
    ports = free_ports(2)
    workers = []
    for index in range(2):
        config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), CUDA_VISIBLE_DEVICES="-1", TMPDIR=str(temporary))
        workers.append(subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), "--limit", "640", "--batch-size", "64",
                                         "--eval-every", "0", "--seed", "4", *flags, "--data-dir", str(mnist_dir),
                                         "--out", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env, cwd=REPO, preexec_fn=as_from_a_terminal))
    return workers


def finish(workers, timeout=240):
    """Each worker's (status, stdout, stderr); a worker left waiting for a dead one is killed (no hang)."""
    results = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for each in workers:
                each.kill()
            out, err = worker.communicate()
        results.append((worker.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_workers_train_one_run_written_once_by_the_chief(tmp_path, mnist_dir):
    run_dir, temporary = tmp_path / "run", tmp_path / "tmp"
    temporary.mkdir()
    results = finish(start_workers(run_dir, mnist_dir, temporary, "--epochs", "2"))
    for status, out, err in results:
        assert status == 0, err[-3000:]
    assert "MultiWorkerMirroredStrategy, worker 0 (chief), 2 replicas of batch 32" in results[0][1]
    assert "MultiWorkerMirroredStrategy, worker 1, 2 replicas of batch 32" in results[1][1]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and len(history["iterations"]["d_loss"]) == 20
    assert sorted(p.name for p in run_dir.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # The chief's only.
    assert not list(temporary.glob("tf2-gan-*"))  # The other worker's directory is gone.


@pytest.mark.slow
def test_a_killed_worker_and_its_chief_resume_together(tmp_path, mnist_dir):
    run_dir, temporary = tmp_path / "run", tmp_path / "tmp"
    temporary.mkdir()
    workers = start_workers(run_dir, mnist_dir, temporary, "--epochs", "3", "--checkpoint-minutes", "0",
                            "--peer-timeout", "1")
    deadline = time.monotonic() + 600
    while not list((run_dir / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers[1].kill()  # SIGKILL: the chief's next collective fails (the health check, or --peer-timeout's bound),
    (status, out, err), _ = finish(workers, timeout=600)  # and it stops by itself, in one line.
    assert status == 1 and err.count("\n") == 1, err[-3000:]
    assert "a worker of the cluster stopped answering" in err
    assert f"start each with: python gan_mnist.py --out {run_dir} --resume" in err
    assert list((run_dir / "checkpoints").glob("ckpt-*.index"))
    assert list(temporary.glob("tf2-gan-worker-1-*"))  # What the kill left.
    results = finish(start_workers(run_dir, mnist_dir, temporary, "--resume"))
    for status, out, err in results:
        assert status == 0, err[-3000:]
    assert "resuming after epoch" in results[0][1] and "resuming after epoch" in results[1][1]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3] and len(history["iterations"]["d_loss"]) == 30
    assert not list(temporary.glob("tf2-gan-*"))  # The killed worker's too, removed by its successor.


MALFORMED_TF_CONFIGS = [
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     'task index 2 is outside the cluster\'s 2 "worker" tasks (0 to 1)'),
    ('{"cluster": {"worker": "a:1,b:2"}, "task": {"type": "worker", "index": 0}}',
     'cluster "worker" must be a list of "host:port" strings, got "a:1,b:2"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', 'no "task" naming this process\'s place in the cluster'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["c:3"]}, "task": {"type": "ps", "index": 0}}',
     'the cluster has "ps" tasks; this project trains with "chief" and "worker" tasks only'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
     'task type "chief" is not in the cluster (worker)'),
    ('{"cluster": [1, 2]}', 'not a JSON object with a "cluster" of task lists'),
    ("{cluster", "not JSON"),
]


@pytest.mark.parametrize("tf_config, problem", MALFORMED_TF_CONFIGS)
def test_every_malformed_tf_config_is_named_with_its_problem(monkeypatch, tf_config, problem):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UsageError) as raised:
        distribute.cluster_tasks()
    assert str(raised.value).startswith(f"environment variable TF_CONFIG: {problem}")


@pytest.mark.parametrize("tf_config, problem", MALFORMED_TF_CONFIGS[:2] + [  # The script's own line; the rest slow.
    pytest.param(*case, marks=pytest.mark.slow) for case in MALFORMED_TF_CONFIGS[2:]])
def test_a_malformed_tf_config_is_one_line_naming_it(tmp_path, tf_config, problem):
    result = run_script("gan_mnist.py", "--out", str(tmp_path / "run"), env_extra={"TF_CONFIG": tf_config})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"error: environment variable TF_CONFIG: {problem}" in result.stderr
    assert not (tmp_path / "run").exists()


def lone_worker(tmp_path, mnist_dir, *flags):
    """Worker 0 of a two-worker cluster whose worker 1 never starts."""
    ports = free_ports(2)
    config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]}, "task": {"type": "worker", "index": 0}}
    env = dict(os.environ, TF_CONFIG=json.dumps(config), CUDA_VISIBLE_DEVICES="-1")
    return subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), "--limit", "640", "--batch-size", "64",
                             "--eval-every", "0", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=as_from_a_terminal)


@pytest.mark.slow
def test_a_worker_whose_peers_never_come_stops_at_its_bound(tmp_path, mnist_dir):
    worker = lone_worker(tmp_path, mnist_dir, "--peer-timeout", "0.05")  # 3 seconds.
    out, err = worker.communicate(timeout=240)
    assert worker.returncode == 2, err[-2000:]
    assert "Waiting up to 0.05 min for the cluster's other workers (localhost:" in out
    assert err.count("\n") == 1 and "argument --peer-timeout: the cluster's other workers (localhost:" in err
    assert "did not start within 0.05 min" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_a_worker_waiting_for_its_peers_stops_on_a_signal(tmp_path, mnist_dir, signum):
    worker = lone_worker(tmp_path, mnist_dir)
    line = ""
    while not line.startswith("Waiting up to 10 min"):  # Printed before the wait; EOF ends the loop if it is not.
        line = worker.stdout.readline()
        assert line, worker.stderr.read()[-2000:]
    worker.send_signal(signum)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 128 + signum and err.count("\n") <= 2, err  # A newline after ^C, then one line.
    assert ("interrupted" if signum == signal.SIGINT else "SIGTERM: stopped; nothing half-written was left") in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# When mirroring pays, and what a mirrored step asks of the other devices
# ------------------------------------------------------------------------------------------------


def test_auto_mirrors_only_when_each_gpus_share_of_a_step_is_large(monkeypatch, capsys):
    import dcgan_mnist
    from conftest import parse

    def work(*flags):
        config = parse(dcgan_mnist, *flags)
        return dcgan_mnist.multiply_adds(config) * config.batch_size

    for count, flags, chosen in ((8, [], "off"), (2, [], "off"), (8, ["--arch", "64"], "mirrored"),
                                 (1, ["--arch", "64"], "off")):
        monkeypatch.setattr(distribute, "gpus", lambda count=count: [f"GPU:{i}" for i in range(count)])
        capsys.readouterr()
        assert distribute.choose("auto", work(*flags)) == chosen
        said = capsys.readouterr().out
        if count == 1:
            assert said == ""
        elif chosen == "off":  # The default DCGAN: 64 x 0.17 G multiply-adds a step, on 8 GPUs 1.4 G each.
            assert f"--distribute auto: one GPU of {count}" in said and f"(all {count}: --distribute mirrored)" in said
        else:  # --arch 64: 100 x 2.0 G, 25 G each on 8.
            assert "--distribute auto: mirrored over the 8 GPUs, each with 25 G" in said and "--distribute off" in said
    assert distribute.choose("mirrored", 0) == "mirrored" and distribute.choose("off", 10**15) == "off"


def test_a_batch_norm_layer_all_reduces_once_in_the_forward_pass():
    calls = []

    class Context:
        num_replicas_in_sync = 2

        def all_reduce(self, op, value):
            calls.append(value.shape)
            return value * 2  # Two replicas holding the same values.

    layer = models.GlobalBatchNormalization()
    inputs = tf.random.normal((6, 3, 3, 4))
    layer.build(inputs.shape)
    alone = layer._moments(inputs, None)  # One replica: tf.nn.moments, no all-reduce.
    with unittest.mock.patch.object(tf.distribute, "get_replica_context", lambda: Context()):
        mean, variance = layer._moments(inputs, None)
    assert calls == [(3, 4)]  # The sums of x and x^2 and the count, per channel, in one collective.
    np.testing.assert_allclose(mean, alone[0], atol=1e-6)
    np.testing.assert_allclose(variance, alone[1], atol=1e-5)


@pytest.mark.slow
def test_a_mirrored_step_keeps_within_its_budget_of_collectives():
    """The default DCGAN on 2 logical devices: 47 cross-replica calls a step before (42 all-reduces, 3 per
    batch-norm forward, and the average of G's merge_call); the budget now is 24."""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "collectives.py"), "dcgan_mnist.py", "--batch-size",
                             "8"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2 and report["per_step"] <= 24, report


@pytest.mark.slow
def test_srun_of_two_tasks_trains_one_run_from_slurms_environment(tmp_path, mnist_dir):
    """Two local tasks under stand-in SLURM_* variables, without TF_CONFIG: TensorFlow's SlurmClusterResolver
    expands the node list and places each task; this machine has no NVIDIA GPU, so none is asked for."""
    port = free_ports(1)[0]
    while not all(_port_free(port + offset) for offset in range(2)):
        port = free_ports(1)[0]
    tasks = []
    for rank in range(2):
        env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
        env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank), SLURM_STEP_NODELIST="localhost",
                   SLURM_STEP_TASKS_PER_NODE="2", GAN_MNIST_SLURM_PORT=str(port), CUDA_VISIBLE_DEVICES="-1",
                   TMPDIR=str(tmp_path))
        tasks.append(subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), "--limit", "640", "--batch-size",
                                       "64", "--eval-every", "0", "--epochs", "1", "--data-dir", str(mnist_dir),
                                       "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=REPO, preexec_fn=as_from_a_terminal))
    results = finish(tasks, timeout=900)
    for rank, (status, out, err) in enumerate(results):
        assert status == 0, err[-3000:]
        assert (f"Slurm: task {rank} of 2 is worker {rank} of localhost:{port}, localhost:{port + 1}, no GPUs"
                in out), out
    assert "MultiWorkerMirroredStrategy, worker 0 (chief), 2 replicas of batch 32" in results[0][1]
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["iterations"]["d_loss"]) == 10


@pytest.mark.slow
def test_workers_that_resolved_different_precisions_are_refused_together(tmp_path, mnist_dir):
    ports = free_ports(2)
    workers = []
    for index, precision in enumerate(("fp32", "bf16")):
        config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), CUDA_VISIBLE_DEVICES="-1", TMPDIR=str(tmp_path))
        workers.append(subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), "--limit", "640", "--eval-every",
                                         "0", "--precision", precision, "--data-dir", str(mnist_dir), "--out",
                                         str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env, cwd=REPO, preexec_fn=as_from_a_terminal))
    for status, out, err in finish(workers, timeout=900):
        assert status == 2 and err.count("\n") == 1, err[-3000:]
        assert ("argument --precision: the cluster's workers resolved different precisions (fp32 on 1 replica, "
                "bf16 on 1 replica); pass the same --precision to every worker") in err
    assert not list((tmp_path / "run").glob("epoch_*.png"))


def _port_free(port):
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return True
        except OSError:
            return False


def test_a_cluster_of_gpus_talks_over_nccl_with_a_collective_timeout(monkeypatch):
    """By construction: what MultiWorkerMirroredStrategy is asked for on a stand-in GPU worker."""
    asked = {}

    class Strategy:
        num_replicas_in_sync = 4

        def __init__(self, communication_options):
            asked["options"] = communication_options

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", Strategy)
    monkeypatch.setattr(distribute, "gpus", lambda: ["GPU:0", "GPU:1"])
    monkeypatch.setattr(distribute, "wait_for_peers", lambda minutes: None)
    monkeypatch.setattr(distribute, "agree_on_precision", lambda strategy, precision: None)
    settings = types.SimpleNamespace(distribute="multi-worker", peer_timeout=2.5, replicas=4, precision="bf16")
    distribute.create(settings)
    options = asked["options"]
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.NCCL
    assert options.timeout_seconds == 150


def test_cpu_devices_without_mirroring_say_so(capsys):
    """Issue 41, 11: --cpu-devices 2 without --distribute mirrored was ignored in silence."""
    from conftest import parsed
    from ganlab import configurator

    values = parsed(gan_mnist, "--cpu-devices", "1", "--distribute", "off")
    capsys.readouterr()
    configurator.with_devices(values)
    assert "--cpu-devices 1: the CPU's logical devices serve --distribute mirrored only; this run trains on one " \
           "device (--distribute off)" in capsys.readouterr().out
