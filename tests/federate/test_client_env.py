"""Each federated client's processes get their own GPU (CUDA_VISIBLE_DEVICES), client i the
(i % n)-th of the n visible ones, when the clients train on CUDA; fake device counts, no GPU."""

import pytest

from moekit.federate.launch import client_env


@pytest.mark.parametrize("device, count, env, want", [
    ("auto", 4, {}, ["0", "1", "2", "3", "0"]),
    ("cuda", 2, {}, ["0", "1", "0", "1", "0"]),
    ("auto", 1, {}, ["0"] * 5),
    ("auto", 2, {"CUDA_VISIBLE_DEVICES": "3,5"}, ["3", "5", "3", "5", "3"]),   # the GPUs we were given
    ("cuda", 3, {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b,GPU-c"},
     ["GPU-a", "GPU-b", "GPU-c", "GPU-a", "GPU-b"]),
])
def test_clients_spread_over_the_visible_gpus(device, count, env, want):
    got = [client_env({"PATH": "/bin", **env}, i, device, count) for i in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in got] == want
    assert all(e["PATH"] == "/bin" for e in got)


@pytest.mark.parametrize("device, count", [("cpu", 4), ("auto", 0), ("cpu", 0)])
def test_cpu_clients_keep_the_environment(device, count):
    env = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert client_env(env, 1, device, count) == env


def test_the_launcher_environment_is_not_changed():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    client_env(env, 1, "cuda", 2)
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
