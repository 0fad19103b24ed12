"""CPUs this process may use: affinity and cgroup v1/v2 CPU quotas, nested, on fake trees."""

from __future__ import annotations

import os

import pytest

from agnostic_prefetch._cpus import cpu_budget


def tree(tmp_path, *, cgroup, mountinfo, files, cpus="0-7"):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/status").write_text(f"Name:\tpython\nCpus_allowed_list:\t{cpus}\n")
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return str(tmp_path)


V1_MOUNTS = ("32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
             "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n")


@pytest.mark.parametrize("quota, period, want", [("150000", "100000", 1.5), ("-1", "100000", 8.0)])
def test_cgroup_v1_quota_and_no_quota(tmp_path, quota, period, want):
    root = tree(tmp_path, cgroup="5:cpuset:/job\n4:cpu,cpuacct:/job\n", mountinfo=V1_MOUNTS, files={
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": quota,
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": period,
    })
    budget = cpu_budget(root)
    assert (budget.cpus, budget.affinity) == (want, 8)
    assert (budget.quota is None) == (quota == "-1")


def test_cgroup_v1_a_parents_tighter_quota_wins_and_a_containers_mount_root_is_honoured(tmp_path):
    # In a container the cpu hierarchy is mounted from /docker/abc: the process's cgroup
    # /docker/abc/worker is the mount's /worker.
    mounts = "40 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    root = tree(tmp_path, cgroup="3:cpu:/docker/abc/worker\n", mountinfo=mounts, files={
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000",  # the container: half a CPU
        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/cpu/worker/cpu.cfs_quota_us": "300000",
        "sys/fs/cgroup/cpu/worker/cpu.cfs_period_us": "100000",
    })
    budget = cpu_budget(root)
    assert budget.cpus == 0.5 and budget.source == "cgroup v1 /sys/fs/cgroup/cpu"
    assert str(budget) == "0.5 CPUs (affinity 8, cgroup quota 0.5 CPUs (cgroup v1 /sys/fs/cgroup/cpu))"


def test_cgroup_v2_nested_quotas_and_affinity(tmp_path):
    mounts = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    root = tree(tmp_path, cgroup="0::/user.slice/job/step\n", mountinfo=mounts, cpus="0-1,4", files={
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000",
        "sys/fs/cgroup/user.slice/job/cpu.max": "250000 100000",
        "sys/fs/cgroup/user.slice/job/step/cpu.max": "max 100000",
    })
    budget = cpu_budget(root)
    assert (budget.affinity, budget.quota, budget.cpus) == (3, 2.5, 2.5)
    assert budget.source == "cgroup v2 /sys/fs/cgroup/user.slice/job"
    tight = tree(tmp_path / "tight", cgroup="0::/a\n", mountinfo=mounts, cpus="0-3", files={
        "sys/fs/cgroup/a/cpu.max": "100000 100000", "sys/fs/cgroup/cpu.max": "50000 100000"})
    assert cpu_budget(tight).cpus == 0.5


def test_no_cgroup_limit_leaves_the_affinity(tmp_path):
    root = tree(tmp_path, cgroup="0::/\n", mountinfo="", files={}, cpus="0-3")
    assert cpu_budget(root).cpus == 4.0 and cpu_budget(root).quota is None


def test_this_machine():
    budget = cpu_budget()
    assert 0 < budget.cpus <= len(os.sched_getaffinity(0))
